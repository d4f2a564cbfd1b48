"""The ACT wrapper (SPEC §4) as pure functions over an explicit carry.

A training step is one call: ``reset_carry`` (halted rows take the new
batch's rows and the initial states), one ``recursion``, then the halting
decision. The carry survives across training steps, which is how a sample
gets up to ``halt_max_steps`` supervision steps ("deep supervision").

Everything architecture-specific comes from ``trm_jax.models``: the named
latents and their reset values, the recursion, and the ACT flavour (halting
on ``q_halt > 0`` or on ``q_halt > q_continue``; whether the Q-continue
target is learned).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp

from trm_jax import models

BATCH_KEYS = ("inputs", "labels", "puzzle_identifiers")


@flax.struct.dataclass
class Carry:
  """The state carried across ACT calls. Every leaf has the batch as its first axis."""
  # The architecture's latents under the original's names, each [B, S+P, D]
  # in the forward dtype: TRM's z_H (the answer, y in the paper) and z_L (z).
  latents: dict[str, jax.Array]
  steps: jax.Array  # [B] int32: supervision steps taken by each row's current sample
  halted: jax.Array  # [B] bool: the row takes a new sample at the next call
  current_data: dict[str, jax.Array]  # the batch rows being worked on (BATCH_KEYS)


def initial_carry(config: models.ModelConfig, batch: Mapping[str, jax.Array]) -> Carry:
  """All rows halted, so the first call takes every row of its batch."""
  batch_size = batch["inputs"].shape[0]
  shape = (batch_size, config.num_positions, config.hidden_size)
  return Carry(
      latents={name: jnp.zeros(shape, config.dtype) for name in models.of(config).latent_names},
      steps=jnp.zeros((batch_size,), jnp.int32),
      halted=jnp.ones((batch_size,), bool),
      current_data={k: jnp.zeros_like(batch[k]) for k in BATCH_KEYS},
  )


def reset_carry(config: models.ModelConfig, params: Mapping[str, Any], carry: Carry,
                batch: Mapping[str, jax.Array]) -> Carry:
  """Halted rows restart on the new batch's rows (latents at their fixed initial
  vectors); the others keep their sample."""
  halted_B = carry.halted

  def where_rows(new, old):
    return jnp.where(halted_B.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)

  inits = dict(models.of(config).latents)
  return Carry(
      latents={name: where_rows(jax.lax.stop_gradient(params[inits[name]]).astype(config.dtype), z)
               for name, z in carry.latents.items()},
      steps=jnp.where(halted_B, 0, carry.steps),
      halted=halted_B,
      current_data={k: where_rows(batch[k], v) for k, v in carry.current_data.items()},
  )


def act_forward(config: models.ModelConfig, params: Mapping[str, Any], puzzle_rows_BxE: jax.Array | None,
                carry: Carry, *, train: bool, rng: jax.Array | None = None
                ) -> tuple[Carry, dict[str, jax.Array]]:
  """One recursion on a reset carry, then the halting rules.

  ``puzzle_rows_BxE`` are the puzzle-embedding rows of
  ``carry.current_data["puzzle_identifiers"]``. ``rng`` drives exploration and
  is needed only when training with ``halt_exploration_prob > 0``.

  Returns the new carry and ``logits [B,S,V]``, ``q_halt_logits [B]``,
  ``q_continue_logits [B]`` and, in training where the architecture learns
  the Q-continue target, ``target_q_continue [B]``.
  """
  arch = models.of(config)
  data = carry.current_data
  latents, logits, q_Bx2 = arch.recursion(config, params, carry.latents, data["inputs"], puzzle_rows_BxE)
  outputs = {"logits": logits, "q_halt_logits": q_Bx2[:, 0], "q_continue_logits": q_Bx2[:, 1]}

  steps = carry.steps + 1
  is_last_step = steps >= config.halt_max_steps
  halted = is_last_step
  if train and config.halt_max_steps > 1:
    q_halt, q_continue = jax.lax.stop_gradient((q_Bx2[:, 0], q_Bx2[:, 1]))
    if arch.halt_on_q_continue(config):
      halted = halted | (q_halt > q_continue)
    else:
      halted = halted | (q_halt > 0)
    if config.halt_exploration_prob > 0:
      if rng is None:
        raise ValueError("act_forward: training with halt_exploration_prob > 0 needs an rng")
      explore_rng, steps_rng = jax.random.split(rng)
      explore = jax.random.uniform(explore_rng, steps.shape) < config.halt_exploration_prob
      min_halt_steps = explore * jax.random.randint(steps_rng, steps.shape, 2, config.halt_max_steps + 1)
      halted = halted & (steps >= min_halt_steps)
    if arch.q_continue_target(config):
      # Q-learning target: the Q values after one more step from the new carry.
      _, _, next_q_Bx2 = arch.recursion(config, jax.lax.stop_gradient(params), latents, data["inputs"],
                                        jax.lax.stop_gradient(puzzle_rows_BxE))
      next_q_halt, next_q_continue = next_q_Bx2[:, 0], next_q_Bx2[:, 1]
      outputs["target_q_continue"] = jax.lax.stop_gradient(jax.nn.sigmoid(
          jnp.where(is_last_step, next_q_halt, jnp.maximum(next_q_halt, next_q_continue))))

  new_carry = Carry(latents=latents, steps=steps, halted=halted, current_data=data)
  return new_carry, outputs
