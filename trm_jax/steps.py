"""The training and evaluation steps: pure functions, jitted by the caller.

``train_step(state, carry, batch) -> (state, carry, metrics)`` is exactly one
ACT call and one optimiser update (SPEC §4–§6). Bind its static settings
with ``functools.partial`` (or use ``make_train_step``), then jit with explicit
shardings, donating the state and the carry. Metrics come back as device
scalars (raw sums): fetch them only on log steps and turn them into the
reported values with ``train_metrics_to_host``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np
import optax

from trm_jax import act
from trm_jax import losses
from trm_jax import models
from trm_jax import optim
from trm_jax.state import TrainState

COUNT_METRICS = ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps")
LOSS_METRICS = ("lm_loss", "q_halt_loss", "q_continue_loss")


def loss_and_grads(model: models.ModelConfig, params: Any, puzzle_emb_NxE: jax.Array, carry: act.Carry,
                   batch: Mapping[str, jax.Array], rng: jax.Array, global_batch_size: int,
                   step_loss_decay: float = 1.0):
  """Reset, forward, and the gradients of ``loss / global_batch_size``
  (``step_loss_decay``: see ``losses.act_loss``; 1.0 is the original's loss).

  Returns ``(new_carry, metrics, grads, (ids_B, row_grads_BxE))``: gradients
  w.r.t. the dense parameters and w.r.t. the gathered puzzle-embedding rows,
  with the ids of those rows (None when there is no puzzle embedding).
  """
  carry = act.reset_carry(model, params, carry, batch)
  rows_BxE = losses.gather_puzzle_rows(model, puzzle_emb_NxE, carry)

  def scaled_loss(p, rows):
    loss, aux = losses.act_loss(model, p, rows, carry, train=True, rng=rng, step_loss_decay=step_loss_decay)
    return loss / global_batch_size, aux

  (_, (new_carry, metrics, _)), (grads, row_grads_BxE) = jax.value_and_grad(
      scaled_loss, argnums=(0, 1), has_aux=True)(params, rows_BxE)
  ids_B = carry.current_data["puzzle_identifiers"]
  return new_carry, metrics, grads, (ids_B, row_grads_BxE)


def train_step(state: TrainState, carry: act.Carry, batch: Mapping[str, jax.Array], *,
               model: models.ModelConfig, optimizers: optim.Optimizers, global_batch_size: int,
               ema_rate: float | None, step_loss_decay: float = 1.0
               ) -> tuple[TrainState, act.Carry, dict[str, jax.Array]]:
  """One ACT call and one update of both parameter groups (and the EMA)."""
  rng = jax.random.fold_in(state.rng, state.step)
  new_carry, metrics, grads, (ids_B, row_grads_BxE) = loss_and_grads(
      model, state.params, state.puzzle_emb, carry, batch, rng, global_batch_size, step_loss_decay)
  update_index = state.step + 1  # the schedules count updates from 1
  updates, opt_state = optimizers.dense.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  puzzle_emb = state.puzzle_emb
  if row_grads_BxE is not None:
    puzzle_emb = optimizers.puzzle_emb_update(puzzle_emb, ids_B, row_grads_BxE, update_index)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = optim.ema_update(ema_params, params, ema_rate)
  new_state = state.replace(step=update_index, params=params, puzzle_emb=puzzle_emb, opt_state=opt_state,
                            ema_params=ema_params)
  metrics = dict(metrics, **optimizers.learning_rates(update_index))
  return new_state, new_carry, metrics


def make_train_step(model: models.ModelConfig, optimizers: optim.Optimizers, global_batch_size: int,
                    ema_rate: float | None, step_loss_decay: float = 1.0):
  """``train_step`` with its static settings bound (not jitted)."""
  return functools.partial(train_step, model=model, optimizers=optimizers,
                           global_batch_size=global_batch_size, ema_rate=ema_rate, step_loss_decay=step_loss_decay)


def train_metrics_to_host(raw: Mapping[str, Any], global_batch_size: int) -> dict[str, float]:
  """Reported train metrics (SPEC §5): counts / count, losses / global batch size."""
  raw = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(raw)).items()}
  count = max(raw["count"], 1.0)
  out = {}
  for k, v in raw.items():
    if k in COUNT_METRICS:
      out[k] = v / count
    elif k in LOSS_METRICS:
      out[k] = v / global_batch_size
    else:
      out[k] = v
  return out


def eval_step(params: Any, puzzle_emb_NxE: jax.Array, batch: Mapping[str, jax.Array], *,
              model: models.ModelConfig) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """``halt_max_steps`` ACT calls on one batch from the initial carry (SPEC §4, §9).

  Returns ``(metrics, outputs)``: the raw metric sums of the last call (all
  rows halted there) and its ``preds [B, S]`` and ``q_halt_logits [B]``.
  """
  carry = act.initial_carry(model, batch)

  def call(carry):
    return losses.act_call(model, params, puzzle_emb_NxE, carry, batch, train=False)

  def body(carry, _):
    carry, *_ = call(carry)
    return carry, None

  carry, _ = jax.lax.scan(body, carry, None, length=model.halt_max_steps - 1)
  _, _, metrics, outputs = call(carry)
  return metrics, {"preds": outputs["preds"], "q_halt_logits": outputs["q_halt_logits"]}


def eval_metrics_to_host(summed: Mapping[str, Any]) -> dict[str, float]:
  """Reported eval metrics (SPEC §5): every sum over the eval set divided by count."""
  summed = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(summed)).items()}
  count = max(summed["count"], 1.0)
  return {k: (v if k == "count" else v / count) for k, v in summed.items()}


def sum_metrics(total: dict[str, Any] | None, new: Mapping[str, Any]) -> dict[str, Any]:
  """Adds one batch's raw metric sums to a running total (host or device values)."""
  if total is None:
    return dict(new)
  return {k: total[k] + new[k] for k in total}
