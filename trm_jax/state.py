"""The training state: one pytree with everything an update changes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trm_jax import models
from trm_jax import optim

# Dense parameters the optimiser never touches: the fixed initial states of
# every architecture (H_init, L_init, L1_init, ...).
FROZEN_PARAMS = models.FROZEN_PARAMS


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (the ACT carry travels beside it).

  ``ema_params`` is None when EMA is off. ``rng`` is the run's base key (raw
  uint32 key data, which checkpoints as a plain array); a step's key is
  ``fold_in(rng, step)``.
  """
  step: jax.Array  # int32 []: updates made so far
  params: Any  # dense parameters, float32
  puzzle_emb: jax.Array  # [num_puzzle_identifiers, puzzle_emb_ndim] float32
  opt_state: optax.OptState  # state of the dense optimiser
  ema_params: Any | None
  rng: jax.Array  # uint32 [2]


def trainable_mask(params: Any) -> Any:
  """False for the frozen initial states, True for every other dense leaf."""
  return {k: (jax.tree.map(lambda _: k not in FROZEN_PARAMS, v)) for k, v in params.items()}


def create_train_state(model: models.ModelConfig, optimizers: optim.Optimizers, seed: int, *,
                       ema: bool, puzzle_emb_rows: int | None = None) -> TrainState:
  """Initial state for ``seed`` (pure: jit it with ``out_shardings`` to build it sharded).

  ``puzzle_emb_rows`` (>= ``num_puzzle_identifiers``) pads the table with zero
  rows so that it splits evenly over the devices; no id reaches the padding.
  """
  rng = jax.random.PRNGKey(seed)
  init_rng, run_rng = jax.random.split(rng)
  params = models.of(model).init_params(model, init_rng)
  rows = model.num_puzzle_identifiers if puzzle_emb_rows is None else puzzle_emb_rows
  if rows < model.num_puzzle_identifiers:
    raise ValueError(f"puzzle_emb_rows={rows} < num_puzzle_identifiers={model.num_puzzle_identifiers}")
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      puzzle_emb=jnp.zeros((rows, model.puzzle_emb_ndim), jnp.float32),
      opt_state=optimizers.dense.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
      rng=run_rng,
  )


def eval_params(state: TrainState) -> Any:
  """The dense parameters to evaluate and export: the EMA copy when there is one.

  As the original, only the trained dense parameters are averaged; the puzzle
  embedding table is used as it is.
  """
  return state.ema_params if state.ema_params is not None else state.params


def extend_puzzle_table(table_NxE: Any, rows: int, *, trained_rows: int | None = None) -> Any:
  """The puzzle table grown to ``rows`` rows for identifiers it has never seen.

  The first ``trained_rows`` rows (default: all of ``table_NxE``; pass the
  dataset's ``num_puzzle_identifiers`` to leave out zero padding rows) are
  kept as they are; every new row is the mean of the trained rows
  ``1..trained_rows-1`` (row 0, the blank identifier's, is never trained).
  The original resets a loaded table of another shape to the mean of its rows
  (``pretrain.py`` ``load_checkpoint``); here the known rows stay usable.
  Pure: numpy in, numpy out; jax in (also under jit), jax out.
  """
  n = table_NxE.shape[0] if trained_rows is None else int(trained_rows)
  if not 0 < n <= table_NxE.shape[0]:
    raise ValueError(f"trained_rows={n}: expected 1..{table_NxE.shape[0]} (the table's rows)")
  if rows < n:
    raise ValueError(f"extend_puzzle_table: rows={rows} < the {n} trained rows")
  xp = jnp if isinstance(table_NxE, jax.Array) else np
  kept = table_NxE[:n]
  if n > 1:
    mean_1xE = xp.mean(table_NxE[1:n].astype(xp.float32), axis=0, keepdims=True).astype(table_NxE.dtype)
  else:
    mean_1xE = xp.zeros((1, table_NxE.shape[1]), table_NxE.dtype)
  return xp.concatenate([kept, xp.broadcast_to(mean_1xE, (rows - n, table_NxE.shape[1]))], axis=0)
