"""Cross-entropies, the ACT loss head and its metrics (SPEC §5).

Precision: the original computes the stablemax cross-entropy in float64. Here
every loss is computed in float64 when ``jax_enable_x64`` is on and in
float32 otherwise (the default; GPUs are slow at float64, and float32 agrees
with the original's numbers to ~1e-6 relative on the golden cases).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from trm_jax import act
from trm_jax import models

IGNORE_LABEL = -100


def loss_dtype() -> jnp.dtype:
  """float64 with ``jax_enable_x64``, else float32."""
  return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def log_stablemax(logits: jax.Array, axis: int = -1) -> jax.Array:
  """log(s(x) / sum s(x)) with s(x) = 1/(1-x) for x < 0, else x + 1."""
  x = logits.astype(loss_dtype())
  # The 1/(1-x) branch sees only x <= 0, so that its gradient stays finite
  # where the other branch is taken (a NaN there would leak through `where`).
  s_x = jnp.where(x < 0, 1.0 / (1.0 - jnp.minimum(x, 0.0)), x + 1.0)
  return jnp.log(s_x) - jnp.log(jnp.sum(s_x, axis=axis, keepdims=True))


def stablemax_cross_entropy(logits_BxSxV: jax.Array, labels_BxS: jax.Array) -> jax.Array:
  """Per-position stablemax CE ``[B, S]``; 0 where the label is ``IGNORE_LABEL``."""
  return _gather_nll(log_stablemax(logits_BxSxV), labels_BxS)


def softmax_cross_entropy(logits_BxSxV: jax.Array, labels_BxS: jax.Array) -> jax.Array:
  """Per-position softmax CE ``[B, S]``; 0 where the label is ``IGNORE_LABEL``."""
  return _gather_nll(jax.nn.log_softmax(logits_BxSxV.astype(loss_dtype()), axis=-1), labels_BxS)


def _gather_nll(logprobs_BxSxV: jax.Array, labels_BxS: jax.Array) -> jax.Array:
  valid = labels_BxS != IGNORE_LABEL
  safe_labels = jnp.where(valid, labels_BxS, 0)
  picked = jnp.take_along_axis(logprobs_BxSxV, safe_labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.where(valid, picked, 0.0)


CROSS_ENTROPIES = {
    "stablemax_cross_entropy": stablemax_cross_entropy,
    "softmax_cross_entropy": softmax_cross_entropy,
}


def binary_cross_entropy_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise, numerically stable: max(x,0) - x*t + log(1 + exp(-|x|))."""
  x = logits.astype(loss_dtype())
  t = targets.astype(loss_dtype())
  return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def act_loss(config: models.ModelConfig, params: Mapping[str, Any], puzzle_rows_BxE: jax.Array | None,
             carry: act.Carry, *, train: bool, rng: jax.Array | None = None, step_loss_decay: float = 1.0
             ) -> tuple[jax.Array, tuple[act.Carry, dict[str, jax.Array], dict[str, jax.Array]]]:
  """The ACT loss head on a reset carry: ``loss, (new_carry, metrics, outputs)``.

  ``loss`` is summed over all rows, halted or not (the train step divides it by
  the global batch size). ``metrics`` are raw sums over the rows that are
  halted after this call and have at least one label: ``count``,
  ``accuracy``, ``exact_accuracy``, ``q_halt_accuracy``, ``steps``, plus the
  summed ``lm_loss``, ``q_halt_loss`` (and ``q_continue_loss``). ``outputs``
  adds ``preds [B, S]`` to the forward's outputs.

  ``step_loss_decay`` (not in the original; 1.0, the default, leaves the loss
  as the original's): a row at its supervision step ``t`` (1 for a new
  sample) weighs ``step_loss_decay ** (t - 1)`` in ``loss``, all its terms
  together (CGAR's supervision weighting, arXiv 2511.08653). The weights are
  not normalised: the optimisers (AdamATan2, SignSGD) ignore a constant scale
  of the gradient. The metrics stay unweighted.
  """
  new_carry, outputs = act.act_forward(config, params, puzzle_rows_BxE, carry, train=train, rng=rng)
  loss, metrics, preds_BxS = loss_and_metrics(config, outputs, new_carry.current_data["labels"], new_carry.halted,
                                              new_carry.steps, step_loss_decay=step_loss_decay)
  outputs = {**outputs, "preds": preds_BxS}
  return loss, (new_carry, metrics, outputs)


def loss_and_metrics(config: models.ModelConfig, outputs: Mapping[str, jax.Array], labels_BxS: jax.Array,
                     halted_B: jax.Array, steps_B: jax.Array, *, step_loss_decay: float = 1.0
                     ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """The loss head on one call's outputs: ``(loss, metrics, preds [B, S])``, as ``act_loss``.

  ``outputs``: ``logits``, ``q_halt_logits``, ``q_continue_logits`` (and
  ``target_q_continue`` when that loss is learned); the metrics count the
  rows of ``halted_B`` that have a label. Also used on the answers an
  evaluation with test-time options keeps (``trm_jax.test_time``).
  """
  logits_BxSxV = outputs["logits"]

  mask_BxS = labels_BxS != IGNORE_LABEL
  counts_B = mask_BxS.sum(-1)
  divisor_B = jnp.maximum(counts_B, 1).astype(loss_dtype())
  preds_BxS = jnp.argmax(logits_BxSxV, axis=-1).astype(jnp.int32)
  correct_BxS = mask_BxS & (preds_BxS == labels_BxS)
  seq_correct_B = correct_BxS.sum(-1) == counts_B

  ce_BxS = CROSS_ENTROPIES[config.loss_type](logits_BxSxV, labels_BxS)
  lm_loss_B = ce_BxS.sum(-1) / divisor_B
  q_halt_loss_B = binary_cross_entropy_with_logits(outputs["q_halt_logits"], seq_correct_B)
  lm_loss = jnp.sum(lm_loss_B)
  q_halt_loss = jnp.sum(q_halt_loss_B)
  loss = lm_loss + 0.5 * q_halt_loss
  row_loss_B = lm_loss_B + 0.5 * q_halt_loss_B
  metrics = {"lm_loss": lm_loss, "q_halt_loss": q_halt_loss}
  if "target_q_continue" in outputs:
    q_continue_loss_B = binary_cross_entropy_with_logits(outputs["q_continue_logits"], outputs["target_q_continue"])
    q_continue_loss = jnp.sum(q_continue_loss_B)
    loss = loss + 0.5 * q_continue_loss
    row_loss_B = row_loss_B + 0.5 * q_continue_loss_B
    metrics["q_continue_loss"] = q_continue_loss
  if step_loss_decay != 1.0:
    weight_B = jnp.asarray(step_loss_decay, loss_dtype()) ** (steps_B - 1).astype(loss_dtype())
    loss = jnp.sum(weight_B * row_loss_B)

  valid_B = halted_B & (counts_B > 0)
  q_halt_B = jax.lax.stop_gradient(outputs["q_halt_logits"])
  metrics.update({
      "count": valid_B.sum(dtype=jnp.int32),
      "accuracy": jnp.sum(jnp.where(valid_B, correct_BxS.sum(-1).astype(jnp.float32) /
                                    jnp.maximum(counts_B, 1).astype(jnp.float32), 0.0)),
      "exact_accuracy": (valid_B & seq_correct_B).sum(dtype=jnp.int32),
      "q_halt_accuracy": (valid_B & ((q_halt_B >= 0) == seq_correct_B)).sum(dtype=jnp.int32),
      "steps": jnp.where(valid_B, steps_B, 0).sum(dtype=jnp.int32),
  })
  metrics = {k: jax.lax.stop_gradient(v) for k, v in metrics.items()}
  return loss, metrics, preds_BxS


def gather_puzzle_rows(config: models.ModelConfig, puzzle_emb_NxE: jax.Array, carry: act.Carry) -> jax.Array | None:
  """The puzzle-embedding rows of the carry's current data, ``[B, puzzle_emb_ndim]``."""
  if not config.puzzle_emb_ndim:
    return None
  return jnp.take(puzzle_emb_NxE, carry.current_data["puzzle_identifiers"].astype(jnp.int32), axis=0)


def act_call(config: models.ModelConfig, params: Mapping[str, Any], puzzle_emb_NxE: jax.Array, carry: act.Carry,
             batch: Mapping[str, jax.Array], *, train: bool, rng: jax.Array | None = None
             ) -> tuple[act.Carry, jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """One whole ACT call, as the original model's forward with its loss head:
  reset, gather the puzzle rows, recurse, halt. Returns
  ``(new_carry, loss, metrics, outputs)``."""
  carry = act.reset_carry(config, params, carry, batch)
  rows = gather_puzzle_rows(config, puzzle_emb_NxE, carry)
  loss, (new_carry, metrics, outputs) = act_loss(config, params, rows, carry, train=train, rng=rng)
  return new_carry, loss, metrics, outputs
