"""Evaluation beyond the original: parallel noisy trajectories and halting at evaluation (issue #12).

The original evaluates every test input with ``halt_max_steps`` supervision
steps from the initial carry and reports the last step's answer (SPEC §9;
``steps.eval_step``). Three options, all off by default, change that at
evaluation only, for any trained checkpoint and any architecture (they go
through the seam: the carry's named latents, ``Architecture.recursion`` and
its halting rule):

- ``eval_trajectories`` (K) and ``eval_noise_sigma`` (sigma): test-time
  scaling by parallel noisy trajectories (PTRM, arXiv 2605.19943). Each test
  input runs as K adjacent rows of one batch (K is a batch axis, so the
  expanded batch is sharded like any batch and each input's trajectories stay
  on its device). Before each supervision step's recursion ("each deep
  recursion step"), Gaussian noise of standard deviation sigma is added to the
  architecture's latents (all of them, or those named in
  ``eval_noise_latents``). Per input, the answer of the trajectory whose Q head
  is most confident (the largest ``q_halt`` logit at its last step) is the
  one reported, under the usual metric names.
- ``eval_halt``: each row stops when its Q head says halt (by the rule the
  architecture trains with: ``q_halt > 0``, or ``q_halt > q_continue``); its
  answer is frozen from then on, and the batch stops once every row has
  stopped (a ``lax.while_loop``). The ``steps`` metric is then the mean number
  of supervision steps the reported answers used.
- ``eval_halt_max_steps``: at most this many supervision steps (0: the
  model's ``halt_max_steps``); larger than the training value gives more
  supervision steps at test time.

With K = 1, sigma = 0 and no halting the original evaluation runs, unchanged
(``steps.eval_step``, with ``eval_halt_max_steps`` if given). Otherwise the
metrics gain ``compute_steps``: the supervision steps computed per test input
over all its trajectories (the batch's loop length times K), the cost.

The noise is a function of ``eval_noise_seed``, the input's content (its
tokens and puzzle id), the trajectory, the step and the latent: not of the
batch the input falls in, the eval batch size or the devices, so that a
result reproduces on any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from trm_jax import act
from trm_jax import losses
from trm_jax import models
from trm_jax import steps
from trm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """The evaluation options of a run (the config's ``eval_*`` keys; see the module docstring)."""
  trajectories: int = 1
  noise_sigma: float = 0.0
  noise_latents: tuple[str, ...] = ()  # () : every latent of the architecture
  noise_seed: int = 0
  halt: bool = False
  halt_max_steps: int = 0  # 0: the model's halt_max_steps

  @property
  def original_loop(self) -> bool:
    """Whether the evaluation is the original's loop (possibly over another number of steps)."""
    return self.trajectories == 1 and self.noise_sigma == 0 and not self.halt

  @property
  def tag(self) -> str:
    """A short name of the options for output directories ("" for the original evaluation)."""
    parts = []
    if self.trajectories > 1 or self.noise_sigma > 0:
      parts.append(f"K{self.trajectories}_sigma{self.noise_sigma:g}")
      if self.noise_latents:
        parts.append("noise-" + "-".join(self.noise_latents))
      if self.noise_seed:
        parts.append(f"seed{self.noise_seed}")
    if self.halt:
      parts.append("halt")
    if self.halt_max_steps:
      parts.append(f"steps{self.halt_max_steps}")
    return "_".join(parts)


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def options_from_config(config: ml_collections.ConfigDict, model: models.ModelConfig) -> EvalOptions:
  """The run's ``EvalOptions``; a one-line ``UserError`` naming the key when one cannot work."""
  k = config.eval_trajectories
  if not _is_int(k) or k < 1:
    raise UserError(f"eval_trajectories={k!r}: expected an integer >= 1 (trajectories per test input)")
  sigma = config.eval_noise_sigma
  if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
    raise UserError(f"eval_noise_sigma={sigma!r}: expected a finite number >= 0 (the noise's standard deviation)")
  names = tuple(n.strip() for n in str(config.eval_noise_latents).split(",") if n.strip())
  latents = models.of(model).latent_names
  unknown = [n for n in names if n not in latents]
  if unknown:
    raise UserError(f"eval_noise_latents={config.eval_noise_latents!r}: {unknown} not a latent of "
                    f"arch={model.arch!r}; expected some of {latents} (empty: all)")
  seed = config.eval_noise_seed
  if not _is_int(seed) or not 0 <= seed < 2**31:
    raise UserError(f"eval_noise_seed={seed!r}: expected an integer in [0, 2**31)")
  if not isinstance(config.eval_halt, (bool, np.bool_)):
    raise UserError(f"eval_halt={config.eval_halt!r}: expected True or False")
  max_steps = config.eval_halt_max_steps
  if not _is_int(max_steps) or max_steps < 0:
    raise UserError(f"eval_halt_max_steps={max_steps!r}: expected an integer >= 0 (0: model.halt_max_steps)")
  return EvalOptions(trajectories=int(k), noise_sigma=float(sigma), noise_latents=names, noise_seed=int(seed),
                     halt=bool(config.eval_halt), halt_max_steps=int(max_steps))


def make_eval_step(model: models.ModelConfig, options: EvalOptions = EvalOptions(), *,
                   batch_sharding: jax.sharding.Sharding | None = None):
  """``(params, puzzle_emb, batch) -> (metrics, outputs)`` for these options (not jitted).

  The original's ``steps.eval_step`` when ``options.original_loop``, else
  ``eval_step``; ``batch_sharding`` keeps the K-fold batch laid out as a batch.
  """
  if options.halt_max_steps:
    model = dataclasses.replace(model, halt_max_steps=options.halt_max_steps)
  if options.original_loop:
    return functools.partial(steps.eval_step, model=model)
  return functools.partial(eval_step, model=model, options=options, batch_sharding=batch_sharding)


# The odd multiplier of the inputs' content hash (2^32 / golden ratio).
_HASH_MULTIPLIER = 0x9E3779B1


def content_hash(inputs_BxS: jax.Array) -> jax.Array:
  """``[B] uint32``: a polynomial hash of each row's tokens (arithmetic mod 2^32)."""
  powers = np.ones(inputs_BxS.shape[1], np.uint64)
  for i in range(1, len(powers)):
    powers[i] = (int(powers[i - 1]) * _HASH_MULTIPLIER) % 2**32
  tokens = inputs_BxS.astype(jnp.uint32) + jnp.uint32(1)
  return jnp.sum(tokens * jnp.asarray(powers.astype(np.uint32)), axis=1, dtype=jnp.uint32)


def trajectory_keys(seed: int, inputs_BxS: jax.Array, puzzle_ids_B: jax.Array, k: int) -> jax.Array:
  """``[B*K]`` PRNG keys, input-major: ``seed`` folded with each input's content, puzzle id and trajectory."""
  base = jax.random.key(seed)

  def per_input(h, pid):
    key = jax.random.fold_in(jax.random.fold_in(base, h), pid)
    return jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k, dtype=jnp.uint32))

  keys_BxK = jax.vmap(per_input)(content_hash(inputs_BxS), puzzle_ids_B.astype(jnp.uint32))
  return keys_BxK.reshape(-1)


def add_noise(latents: Mapping[str, jax.Array], keys_R: jax.Array, step: jax.Array, sigma: float,
              names: tuple[str, ...], order: tuple[str, ...]) -> dict[str, jax.Array]:
  """``z + sigma * N(0, 1)`` for each latent in ``names``.

  Row r's noise is one draw from ``keys_R[r]`` and the step for all of the
  architecture's latents (``order``, which all have one shape), of which
  each named latent takes its own: one random call per step, however many
  latents there are.
  """
  first = latents[order[0]]
  work = jnp.promote_types(first.dtype, jnp.float32)

  def row_noise(key):
    return jax.random.normal(jax.random.fold_in(key, step), (len(order),) + first.shape[1:], work)
  noise_RxLx = jax.vmap(row_noise)(keys_R)
  out = dict(latents)
  for name in names:
    z = latents[name]
    out[name] = (z.astype(work) + sigma * noise_RxLx[:, order.index(name)]).astype(z.dtype)
  return out


def run_trajectories(params: Any, puzzle_emb_NxE: jax.Array, batch: Mapping[str, jax.Array], *,
                     model: models.ModelConfig, options: EvalOptions,
                     batch_sharding: jax.sharding.Sharding | None = None
                     ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """Every trajectory of every input: ``(answers, steps_R, calls)``, R = B*K rows, input-major.

  ``answers``: each row's ``logits``, ``q_halt_logits`` and
  ``q_continue_logits`` at its last step (where it halted, or the last one);
  ``steps_R`` the supervision steps it used; ``calls`` the steps the batch
  ran (the loop's length).
  """
  arch = models.of(model)
  k, n = options.trajectories, model.halt_max_steps

  def as_batch(x):
    return x if batch_sharding is None else jax.lax.with_sharding_constraint(x, batch_sharding)

  # Each input's K trajectories are adjacent rows: a batch shard holds all of its inputs' trajectories.
  rows = {key: as_batch(jnp.repeat(v, k, axis=0) if k > 1 else v) for key, v in batch.items()}
  carry = act.reset_carry(model, params, act.initial_carry(model, rows), rows)
  puzzle_rows = losses.gather_puzzle_rows(model, puzzle_emb_NxE, carry)
  if options.noise_sigma > 0:
    keys_R = trajectory_keys(options.noise_seed, batch["inputs"], batch["puzzle_identifiers"], k)
    noisy = options.noise_latents or arch.latent_names

  def call(latents, t):
    """One supervision step: the noise, the recursion, and whether each row stops after it."""
    if options.noise_sigma > 0:
      latents = add_noise(latents, keys_R, t, options.noise_sigma, noisy, arch.latent_names)
    latents, logits, q_Rx2 = arch.recursion(model, params, latents, rows["inputs"], puzzle_rows)
    out = {"logits": logits, "q_halt_logits": q_Rx2[:, 0], "q_continue_logits": q_Rx2[:, 1]}
    stop = jnp.broadcast_to(t + 1 >= n, q_Rx2.shape[:1])
    if options.halt:
      q_halt, q_continue = out["q_halt_logits"], out["q_continue_logits"]
      stop = stop | ((q_halt > q_continue) if arch.halt_on_q_continue(model) else (q_halt > 0))
    return latents, out, stop

  # The first step outside the loop, as the original's program has one step outside its scan: with K = 1,
  # no noise and no halting, this rounds exactly as the original (a first step inside the loop does not).
  latents, kept, done = call(carry.latents, jnp.int32(0))
  used = jnp.ones(done.shape, jnp.int32)

  def cond(state):
    _, t, done, _, _ = state
    return (t < n) & ~jnp.all(done) if options.halt else t < n

  def body(state):
    latents, t, done, kept, used = state
    latents, out, stop = call(latents, t)
    # Rows that stopped before keep their answer; the others take this step's.
    kept = jax.tree.map(lambda old, new: jnp.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
                        kept, out)
    used = jnp.where(done, used, t + 1)
    return latents, t + 1, done | stop, kept, used

  _, calls, _, kept, used = jax.lax.while_loop(cond, body, (latents, jnp.int32(1), done, kept, used))
  return kept, used, calls


def eval_step(params: Any, puzzle_emb_NxE: jax.Array, batch: Mapping[str, jax.Array], *,
              model: models.ModelConfig, options: EvalOptions,
              batch_sharding: jax.sharding.Sharding | None = None
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """One test batch with trajectories, noise and/or halting (see the module docstring).

  Returns what ``steps.eval_step`` does, for the reported answer of each
  input: the raw metric sums (plus ``compute_steps``) and ``preds [B, S]``,
  ``q_halt_logits [B]``.
  """
  kept, used, calls = run_trajectories(params, puzzle_emb_NxE, batch, model=model, options=options,
                                       batch_sharding=batch_sharding)
  return report(model, options.trajectories, kept, used, calls, batch["labels"])


def report(model: models.ModelConfig, k: int, kept: Mapping[str, jax.Array], used_R: jax.Array, calls: jax.Array,
           labels_BxS: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Per input, the answer of its most confident trajectory, scored as the original's last call."""
  b = labels_BxS.shape[0]
  if k > 1:
    # The trajectory with the largest q_halt logit (the first on ties).
    best_B = jnp.argmax(kept["q_halt_logits"].reshape(b, k), axis=1)

    def choose(x):
      x = x.reshape((b, k) + x.shape[1:])
      return jnp.take_along_axis(x, best_B.reshape((b, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
    kept, used_R = jax.tree.map(choose, dict(kept)), choose(used_R)
  _, metrics, preds_BxS = losses.loss_and_metrics(model, kept, labels_BxS, jnp.ones((b,), bool), used_R)
  valid_B = (labels_BxS != losses.IGNORE_LABEL).sum(-1) > 0
  metrics["compute_steps"] = jnp.where(valid_B, calls * k, 0).sum(dtype=jnp.int32)
  return metrics, {"preds": preds_BxS, "q_halt_logits": kept["q_halt_logits"]}
