"""Optimisation of TRM (SPEC §6): AdamATan2, sparse SignSGD, schedule, EMA.

Two parameter groups share one schedule shape, each with its own base lr:

* every dense trainable parameter -> ``adam_atan2`` (an ordinary
  ``optax.GradientTransformation``);
* the puzzle-embedding table -> ``sparse_sign_sgd_update``, a pure function
  that changes only the rows whose ids are in the (global) batch.

Step numbers are 1-BASED everywhere: the ``t``-th update (t = 1, 2, ...) uses
``schedule(t)``, as the original increments its step counter before computing
the learning rate. The dense transformation counts its own updates; for the
puzzle embedding and for logging the caller passes ``t`` itself (e.g.
``state.step + 1`` when ``state.step`` counts the updates already made).

Typical use in a train step::

  opt = optim.make_optimizers(
      lr=1e-4, weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1,
      beta1=0.9, beta2=0.95, warmup_steps=2000, total_steps=total, lr_min_ratio=1.0,
      trainable_mask=mask)                     # False for H_init / L_init
  opt_state = opt.dense.init(dense_params)     # once
  # per step, with t = the 1-based number of this update:
  updates, opt_state = opt.dense.update(dense_grads, opt_state, dense_params)
  dense_params = optax.apply_updates(dense_params, updates)
  table_NxE = opt.puzzle_emb_update(table_NxE, ids_B, grads_BxE, t)
  ema_params = optim.ema_update(ema_params, dense_params, 0.999)
  logs = opt.learning_rates(t)                 # {"lr": ..., "puzzle_emb_lr": ...}

The dense transformation must not see the puzzle-embedding table (keep it out
of ``dense_params`` or mark it False in ``trainable_mask``): the table has its
own optimiser.

``check_adam_atan2_golden`` replays ``golden/adam_atan2.npz`` for the parity
CLI; ``ADAM_ATAN2_GOLDEN_TOLERANCE`` holds the agreed tolerances.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[Any], jax.Array]
ScalarOrSchedule = float | Schedule

# Worst relative error (max abs error / max abs value) per step allowed
# against golden/adam_atan2.npz, by the dtype the optimiser runs in.
ADAM_ATAN2_GOLDEN_TOLERANCE = {"float64": 1e-6, "float32": 1e-5}


# ----------------------------------------------------------------------------
# AdamATan2
# ----------------------------------------------------------------------------


class AdamAtan2State(NamedTuple):
  count: jax.Array  # int32 []: number of updates already made.
  mu: optax.Updates  # first moment, in each parameter's dtype
  nu: optax.Updates  # second moment, in each parameter's dtype


def _increment(count: jax.Array) -> jax.Array:
  # Saturates instead of wrapping around at int32 max.
  return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def adam_atan2(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.95,
               weight_decay: float = 0.1) -> optax.GradientTransformation:
  """AdamATan2 with decoupled weight decay (SPEC §6), as an optax transformation.

  For the t-th update (t = 1, 2, ...), with ``lr = learning_rate(t)`` when
  ``learning_rate`` is a schedule::

    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)
    v = v + (1 - b2) * (g * g - v)
    p = p - (lr / (1 - b1^t)) * atan2(m, sqrt(v) / sqrt(1 - b2^t))

  No epsilon; the decay applies to every leaf given. ``update`` returns
  ``new_p - p`` (needs ``params``), so ``optax.apply_updates`` yields ``new_p``.
  Moments and elementwise arithmetic use each parameter's dtype; the scalars
  (lr, bias corrections) are computed in at least float32.
  """

  def init_fn(params: optax.Params) -> AdamAtan2State:
    return AdamAtan2State(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(jnp.zeros_like, params),
        nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(grads: optax.Updates, state: AdamAtan2State,
                params: optax.Params | None = None) -> tuple[optax.Updates, AdamAtan2State]:
    if params is None:
      raise ValueError("adam_atan2: update() needs params (for the decoupled weight decay)")
    step = _increment(state.count)
    lr = learning_rate(step) if callable(learning_rate) else learning_rate

    mu = jax.tree.map(lambda g, m: m + (1 - b1) * (g.astype(m.dtype) - m), grads, state.mu)
    nu = jax.tree.map(lambda g, v: v + (1 - b2) * (jnp.square(g.astype(v.dtype)) - v),
                      grads, state.nu)

    def leaf_update(m, v, p):
      # Scalars in at least float32 (bias corrections are poor in bfloat16),
      # elementwise work in the parameter's dtype.
      dtype = p.dtype
      scalar_dtype = jnp.promote_types(dtype, jnp.float32)
      lr_ = jnp.asarray(lr, scalar_dtype)
      t = step.astype(scalar_dtype)
      bias_correction1 = 1 - jnp.asarray(b1, scalar_dtype) ** t
      bias_correction2 = 1 - jnp.asarray(b2, scalar_dtype) ** t
      step_size = (lr_ / bias_correction1).astype(dtype)
      denom = jnp.sqrt(v) / jnp.sqrt(bias_correction2).astype(dtype)
      decay = (lr_ * weight_decay).astype(dtype)
      # Decay and step with the same lr; returned as a difference so that
      # apply_updates rounds once.
      return -decay * p - step_size * jnp.arctan2(m, denom)

    updates = jax.tree.map(leaf_update, mu, nu, params)
    return updates, AdamAtan2State(count=step, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------
# Sparse SignSGD for the puzzle embedding
# ----------------------------------------------------------------------------


def sparse_sign_sgd_update(table_NxE: jax.Array, ids_B: jax.Array, grads_BxE: jax.Array,
                           lr: Any, weight_decay: Any) -> jax.Array:
  """SignSGD with decoupled decay on the rows of ``table_NxE`` named in ``ids_B``.

  ``ids_B`` / ``grads_BxE`` are the GLOBAL batch (ids of the gathered rows and
  the gradients w.r.t. them). Gradients of duplicate ids are summed, then each
  such row becomes ``row * (1 - lr * wd) - lr * sign(grad_sum)``; every other
  row is returned bit-identical. Ids outside ``[0, N)`` are ignored.

  Pure and jittable. Work is O(B log B + B * E): a static-size unique over the
  B ids, a segment sum, a gather of at most B rows and a scatter back; nothing
  of shape ``[N, E]`` is made besides the result. Under jit with a row-sharded
  table and batch-sharded ids/grads, GSPMD gathers the (small) batch and
  scatters into the local shards.
  """
  table_NxE, ids_B, grads_BxE = jnp.asarray(table_NxE), jnp.asarray(ids_B), jnp.asarray(grads_BxE)
  num_rows = table_NxE.shape[0]
  batch = ids_B.shape[0]
  ids_B = ids_B.astype(jnp.int32)
  # Out-of-range ids join the fill value `num_rows`, which sorts after every
  # valid id, so the unique ids stay sorted with the padding at the end.
  valid_B = (ids_B >= 0) & (ids_B < num_rows)
  ids_B = jnp.where(valid_B, ids_B, num_rows)
  unique_ids_U, inverse_B = jnp.unique(ids_B, return_inverse=True, size=batch,
                                       fill_value=num_rows)
  inverse_B = inverse_B.reshape(batch)

  acc_dtype = jnp.promote_types(table_NxE.dtype, jnp.float32)
  grad_sum_UxE = jax.ops.segment_sum(grads_BxE.astype(acc_dtype), inverse_B,
                                     num_segments=batch, indices_are_sorted=False)

  # Give every padding slot its own out-of-range index: the indices are then
  # truly unique and sorted, and the scatter drops the padding.
  slot_U = jnp.arange(batch, dtype=jnp.int32)
  rows_U = jnp.where(unique_ids_U < num_rows, unique_ids_U, num_rows + slot_U)

  rows_UxE = table_NxE.at[rows_U].get(mode="fill", fill_value=0, indices_are_sorted=True,
                                      unique_indices=True).astype(acc_dtype)
  lr = jnp.asarray(lr, acc_dtype)
  decay = 1 - lr * jnp.asarray(weight_decay, acc_dtype)
  new_rows_UxE = rows_UxE * decay - lr * jnp.sign(grad_sum_UxE)
  return table_NxE.at[rows_U].set(new_rows_UxE.astype(table_NxE.dtype), mode="drop",
                                  indices_are_sorted=True, unique_indices=True)


# ----------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------


def cosine_schedule_with_warmup(base_lr: float, warmup_steps: int, total_steps: int,
                                min_ratio: float) -> Schedule:
  """The original's lr schedule: linear warmup from 0, then cosine to ``base_lr * min_ratio``.

  ``step < warmup_steps``: ``base_lr * step / max(1, warmup_steps)``; else with
  ``progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)``:
  ``base_lr * (min_ratio + max(0, (1 - min_ratio) * 0.5 * (1 + cos(pi * progress))))``.
  ``min_ratio = 1`` is a constant lr after warmup. Accepts python or traced
  integer steps; returns a float scalar array (float64 only under x64).
  """
  if warmup_steps < 0 or total_steps < 0:
    raise ValueError(f"schedule: warmup_steps ({warmup_steps}) and total_steps ({total_steps}) "
                     "must be >= 0")

  def schedule(step: Any) -> jax.Array:
    step_f = jnp.asarray(step).astype(jnp.result_type(float))
    warmup_lr = base_lr * step_f / max(1, warmup_steps)
    progress = (step_f - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = jnp.maximum(0.0, (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return jnp.where(step_f < warmup_steps, warmup_lr, base_lr * (min_ratio + cosine))

  return schedule


def total_train_steps(epochs: float, total_groups: int, mean_puzzle_examples: float,
                      global_batch_size: int) -> int:
  """``int(epochs * total_groups * mean_puzzle_examples / global_batch_size)`` (SPEC §6)."""
  return int(epochs * total_groups * mean_puzzle_examples / global_batch_size)


# ----------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------


def ema_update(ema_params: Any, params: Any, rate: Any) -> Any:
  """``rate * ema + (1 - rate) * params`` per leaf, in each EMA leaf's dtype."""
  return jax.tree.map(lambda e, p: (rate * e + (1 - rate) * p).astype(e.dtype),
                      ema_params, params)


# ----------------------------------------------------------------------------
# The two parameter groups
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Optimizers:
  """The dense optimiser plus the puzzle-embedding update, under one schedule shape.

  Attributes:
    dense: AdamATan2 (with its schedule, optional clipping and the trainable
      mask) for the dense parameters.
    lr_schedule: 1-based step -> lr of ``dense``.
    puzzle_emb_lr_schedule: 1-based step -> lr of the puzzle embedding.
    puzzle_emb_weight_decay: decay of the puzzle-embedding rows.
  """
  dense: optax.GradientTransformation
  lr_schedule: Schedule
  puzzle_emb_lr_schedule: Schedule
  puzzle_emb_weight_decay: float

  def puzzle_emb_update(self, table_NxE: jax.Array, ids_B: jax.Array, grads_BxE: jax.Array,
                        step: Any) -> jax.Array:
    """Sparse SignSGD for the ``step``-th (1-based) update."""
    return sparse_sign_sgd_update(table_NxE, ids_B, grads_BxE,
                                  self.puzzle_emb_lr_schedule(step), self.puzzle_emb_weight_decay)

  def learning_rates(self, step: Any) -> dict[str, jax.Array]:
    """Both learning rates of the ``step``-th (1-based) update, for logging."""
    return {"lr": self.lr_schedule(step), "puzzle_emb_lr": self.puzzle_emb_lr_schedule(step)}


def make_optimizers(*, lr: float, weight_decay: float, puzzle_emb_lr: float,
                    puzzle_emb_weight_decay: float, beta1: float, beta2: float,
                    warmup_steps: int, total_steps: int, lr_min_ratio: float,
                    grad_clip_norm: float | None = None, freeze_weights: bool = False,
                    trainable_mask: Any = None) -> Optimizers:
  """Builds both optimisers of SPEC §6.

  Args:
    lr, weight_decay, beta1, beta2: AdamATan2 of the dense parameters.
    puzzle_emb_lr, puzzle_emb_weight_decay: sparse SignSGD of the puzzle table.
    warmup_steps, total_steps, lr_min_ratio: the shared schedule shape.
    grad_clip_norm: clip the dense gradients to this global norm (computed over
      the trainable leaves) before AdamATan2; None (the original) for no clipping.
    freeze_weights: every dense parameter gets a zero update (only the puzzle
      embedding trains).
    trainable_mask: None (all dense leaves train), or a pytree of bools shaped
      like the dense params, or a function params -> such a pytree. False leaves
      (e.g. H_init, L_init) get zero updates, no decay and no optimiser state.
  """
  if grad_clip_norm is not None and not grad_clip_norm > 0:
    raise ValueError(f"grad_clip_norm must be None or > 0, got {grad_clip_norm}")
  lr_schedule = cosine_schedule_with_warmup(lr, warmup_steps, total_steps, lr_min_ratio)
  puzzle_emb_lr_schedule = cosine_schedule_with_warmup(puzzle_emb_lr, warmup_steps,
                                                       total_steps, lr_min_ratio)
  if freeze_weights:
    dense = optax.set_to_zero()
  else:
    dense = adam_atan2(lr_schedule, b1=beta1, b2=beta2, weight_decay=weight_decay)
    if grad_clip_norm is not None:
      dense = optax.chain(optax.clip_by_global_norm(grad_clip_norm), dense)
    if trainable_mask is not None:
      def labels(params):
        mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
        return jax.tree.map(lambda trainable: "trainable" if trainable else "frozen", mask)
      dense = optax.multi_transform({"trainable": dense, "frozen": optax.set_to_zero()}, labels)
  return Optimizers(dense=dense, lr_schedule=lr_schedule,
                    puzzle_emb_lr_schedule=puzzle_emb_lr_schedule,
                    puzzle_emb_weight_decay=puzzle_emb_weight_decay)


# ----------------------------------------------------------------------------
# Golden check
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _x64() -> Iterator[None]:
  """Float64 on inside the block, whatever the global setting."""
  if hasattr(jax, "enable_x64"):  # jax >= 0.7: a config context manager
    with jax.enable_x64(True):
      yield
  else:
    from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
    with enable_x64():
      yield


def _golden_array(npz_data: Mapping[str, Any], key: str, shape: tuple[int, ...] | None) -> np.ndarray:
  if key not in npz_data:
    raise ValueError(f"adam_atan2 golden: missing key '{key}'")
  value = np.asarray(npz_data[key])
  if shape is not None and value.shape != shape:
    raise ValueError(f"adam_atan2 golden: key '{key}' has shape {value.shape}, expected {shape}")
  return value


def _golden_hparams(npz_data: Mapping[str, Any]) -> dict[str, Any]:
  raw = _golden_array(npz_data, "hparams_json", ())
  try:
    hparams = json.loads(str(raw))
  except json.JSONDecodeError as e:
    raise ValueError(f"adam_atan2 golden: key 'hparams_json' is not valid JSON ({e})") from None
  if not isinstance(hparams, dict):
    raise ValueError("adam_atan2 golden: key 'hparams_json' must hold a JSON object")
  for field in ("lr", "beta1", "beta2", "weight_decay"):
    if not isinstance(hparams.get(field), (int, float)):
      raise ValueError(f"adam_atan2 golden: key 'hparams_json' lacks a number '{field}'")
  if "steps" not in hparams:  # count the recorded steps
    hparams["steps"] = 0
    while f"grad{hparams['steps'] + 1}" in npz_data:
      hparams["steps"] += 1
  if not isinstance(hparams["steps"], int) or hparams["steps"] < 1:
    raise ValueError(f"adam_atan2 golden: key 'hparams_json' has steps={hparams['steps']!r}, "
                     "expected an integer >= 1")
  return hparams


def check_adam_atan2_golden(npz_data: Mapping[str, Any], dtype: str = "float64") -> dict[str, float]:
  """Replays ``adam_atan2.npz`` in ``dtype``; returns the relative error per step.

  Starts from ``param0``, feeds ``grad1..gradN`` (N = ``steps`` of
  ``hparams_json``, else the number of ``grad<t>`` keys) with the file's lr,
  betas and weight decay, and compares with ``param1..paramN``. Returns
  ``{"param<t>": max|ours - golden| / max|golden|}``; compare with
  ``ADAM_ATAN2_GOLDEN_TOLERANCE[dtype]``. Float64 runs with x64 switched on for
  the duration of the call only. A missing key or a wrong shape raises a
  ValueError naming the key.
  """
  if dtype not in ADAM_ATAN2_GOLDEN_TOLERANCE:
    raise ValueError(f"dtype must be one of {sorted(ADAM_ATAN2_GOLDEN_TOLERANCE)}, got {dtype!r}")
  hparams = _golden_hparams(npz_data)
  param0 = _golden_array(npz_data, "param0", None)
  steps = range(1, hparams["steps"] + 1)
  grads = [_golden_array(npz_data, f"grad{t}", param0.shape) for t in steps]
  expected = [_golden_array(npz_data, f"param{t}", param0.shape) for t in steps]

  opt = adam_atan2(float(hparams["lr"]), b1=float(hparams["beta1"]), b2=float(hparams["beta2"]),
                   weight_decay=float(hparams["weight_decay"]))

  @jax.jit
  def step_fn(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  errors = {}
  with _x64() if dtype == "float64" else contextlib.nullcontext():
    params = jnp.asarray(param0, dtype)
    state = opt.init(params)
    for t, grad, want in zip(steps, grads, expected):
      params, state = step_fn(params, state, jnp.asarray(grad, dtype))
      got = np.asarray(params, np.float64)
      errors[f"param{t}"] = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-300))
  return errors
