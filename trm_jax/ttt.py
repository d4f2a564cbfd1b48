"""Test-time training: ARC puzzles a run never saw learn their embedding before prediction.

TRM knows a puzzle through its row of the puzzle-embedding table, learnt in
training; a puzzle that was not in the run's data has no row and gets the
blank one, which is close to useless. ``run_ttt`` gives the new puzzles of a
challenges file rows of their own and trains them on their demonstration
pairs, as every ARC Prize entry built on TRM does (arXiv 2511.02886):

1. ``data_prep.arc`` (run as a subprocess, ``trm_jax.datasets``) builds the
   new puzzles' augmented versions into a temporary directory (removed afterwards): the train split holds the
   demonstration pairs of every version (translated, as in training);
2. the table gets one row per new identifier, initialised to the mean of the
   trained rows (``state.extend_puzzle_table``); the new dataset's identifier
   ``i > 0`` is row ``num_puzzle_identifiers - 1 + i``, so the run's own rows
   keep their numbers and stay unchanged;
3. ``config.ttt.steps`` steps of ``steps.make_train_step`` on that split,
   with fresh optimiser states: ``embeddings`` trains the new rows only (the
   original's ``freeze_weights``), ``all`` the network too,
   ``embeddings_then_all`` switches at ``switch_fraction`` of the steps (the
   dense optimiser then starts, with its own warmup). No EMA: the dense
   parameters start from the run's evaluation (EMA) parameters;
4. the loss and accuracy on the new puzzles' demonstration pairs (as given,
   untransformed, in eval mode) are measured before and after.

With ``time_budget_s``, training stops early enough for the voting that
follows: its time is estimated from the number of predictions and a measured
evaluation batch. ``trm_jax.predict`` then votes over every version.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import data as data_lib
from trm_jax import dataset_format
from trm_jax import datasets
from trm_jax import errors
from trm_jax import monitor as monitor_lib
from trm_jax import optim
from trm_jax import sharding
from trm_jax import state as state_lib
from trm_jax import steps
from trm_jax import evaluation
from trm_jax import runs
from trm_jax.tasks import arc as arc_data

MODES = ("embeddings", "all", "embeddings_then_all")
# Seconds kept free beyond the estimated voting time when a time budget is set.
BUDGET_MARGIN_S = 5.0
# The estimated voting time is scaled by this (batches vary a little; host work between them).
VOTE_TIME_FACTOR = 1.25


@dataclasses.dataclass(frozen=True)
class Settings:
  """``config.ttt``, checked."""
  steps: int
  mode: str
  switch_fraction: float
  lr: float
  puzzle_emb_lr: float
  warmup_steps: int
  num_aug: int
  batch_size: int
  time_budget_s: float


def settings(config) -> Settings:
  """``config.ttt`` as ``Settings``; a ``errors.UserError`` naming the key when a value is wrong."""
  t = config.ttt
  checks = [
      ("steps", isinstance(t.steps, int) and t.steps >= 0, "an integer >= 0"),
      ("mode", t.mode in MODES, f"one of {MODES}"),
      ("switch_fraction", 0.0 <= t.switch_fraction <= 1.0, "a number in [0, 1]"),
      ("lr", t.lr >= 0, "a number >= 0"),
      ("puzzle_emb_lr", t.puzzle_emb_lr >= 0, "a number >= 0"),
      ("warmup_steps", isinstance(t.warmup_steps, int) and t.warmup_steps >= 0, "an integer >= 0"),
      ("num_aug", isinstance(t.num_aug, int) and t.num_aug >= 0, "an integer >= 0"),
      ("batch_size", isinstance(t.batch_size, int) and t.batch_size >= 0,
       "an integer >= 0 (0: the run's global_batch_size)"),
      ("time_budget_s", t.time_budget_s >= 0, "a number of seconds >= 0 (0: no budget)"),
  ]
  for key, ok, expected in checks:
    if not ok:
      raise errors.UserError(f"config.ttt.{key}={t[key]!r}: expected {expected}")
  return Settings(steps=t.steps, mode=t.mode, switch_fraction=float(t.switch_fraction), lr=float(t.lr),
                  puzzle_emb_lr=float(t.puzzle_emb_lr), warmup_steps=t.warmup_steps, num_aug=t.num_aug,
                  batch_size=t.batch_size or config.global_batch_size, time_budget_s=float(t.time_budget_s))


def phases(s: Settings) -> list[tuple[int, int, bool]]:
  """``[(first step, end step, embeddings only)]``: the steps split by what trains."""
  if s.mode == "embeddings":
    parts = [(0, s.steps, True)]
  elif s.mode == "all":
    parts = [(0, s.steps, False)]
  else:
    switch = round(s.switch_fraction * s.steps)
    parts = [(0, switch, True), (switch, s.steps, False)]
  return [p for p in parts if p[1] > p[0]]


# ---------------------------------------------------------------------------
# Evaluation rows, shared with trm_jax.predict.


def eval_rows(run: runs.Run, eval_fn, params: Any, table: jax.Array, inputs_NxS: np.ndarray,
              labels_NxS: np.ndarray, ids_N: np.ndarray,
              on_batch: Callable[[slice, dict[str, Any], dict[str, np.ndarray]], None]) -> list[float]:
  """Runs ``eval_fn`` over rows in padded global batches (padding: blank id, no labels).

  ``on_batch(rows, device metrics, host outputs)`` sees each batch; the outputs
  (``preds``, ``q_halt_logits``) are cut to the real rows. Returns the wall
  time of each batch (the first includes any compilation).
  """
  bs = run.eval_batch_size
  local = bs // jax.process_count()
  lo = jax.process_index() * local
  times = []
  for start in range(0, inputs_NxS.shape[0], bs):
    t0 = time.perf_counter()
    end = min(start + bs, inputs_NxS.shape[0])
    pad = bs - (end - start)
    batch = {"inputs": np.pad(inputs_NxS[start:end], ((0, pad), (0, 0))),
             "labels": np.pad(labels_NxS[start:end], ((0, pad), (0, 0)), constant_values=dataset_format.IGNORE_LABEL),
             "puzzle_identifiers": np.pad(ids_N[start:end], (0, pad))}
    batch = sharding.global_batch({k: v[lo:lo + local] for k, v in batch.items()}, run.mesh, bs)
    metrics, outputs = eval_fn(params, table, batch)
    host = {k: evaluation.to_host(v)[:end - start] for k, v in outputs.items()}
    on_batch(slice(start, end), metrics, host)
    times.append(time.perf_counter() - t0)
  return times


def demonstration_rows(puzzles: Sequence[arc_data.Puzzle], row_of: dict[str, int]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The puzzles' demonstration pairs as given, at the canvas origin: inputs, labels, table rows."""
  inputs, labels, ids = [], [], []
  for puzzle in puzzles:
    for inp, out in puzzle.split_pairs(False):
      inputs.append(arc_data.grid_canvas(inp).reshape(-1))
      label = arc_data.grid_canvas(out).reshape(-1).astype(np.int32)
      labels.append(np.where(label == arc_data.PAD_ID, dataset_format.IGNORE_LABEL, label))
      ids.append(row_of[puzzle.id])
  return (np.stack(inputs).astype(np.int32), np.stack(labels).astype(np.int32), np.asarray(ids, np.int32))


def demonstration_metrics(run: runs.Run, eval_fn, params: Any, table: jax.Array,
                          rows: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[dict[str, float], list[float]]:
  """Eval-mode loss and accuracies on demonstration rows; and the batch times."""
  summed: dict[str, Any] | None = None

  def add(_, metrics, __):
    nonlocal summed
    summed = steps.sum_metrics(summed, jax.device_get(metrics))

  times = eval_rows(run, eval_fn, params, table, *rows, on_batch=add)
  reported = steps.eval_metrics_to_host(summed)
  keep = ("lm_loss", "accuracy", "exact_accuracy", "count")
  return {k: reported[k] for k in keep if k in reported}, times


# ---------------------------------------------------------------------------
# The new puzzles' dataset.


def _build_dataset(puzzles: Sequence[arc_data.Puzzle], directory: pathlib.Path, num_aug: int) -> list[str]:
  """Builds the new puzzles' augmented versions (demonstration pairs only); returns its identifiers."""
  challenges = {}
  for p in puzzles:
    raw = {kind: [dict(ex) for ex in p.raw[kind]] for kind in p.raw}
    for ex in raw["test"]:
      ex.pop("output", None)  # never trained on, whatever the challenges file holds
    challenges[p.id] = raw
  path = directory / "challenges.json"
  dataset_format.write_json(path, challenges)

  def show(line: str) -> None:  # the missing solutions are expected here
    if "no solutions file" not in line and not line.startswith("warning: 1 warning(s)"):
      print(line, end="", file=sys.stderr)

  datasets.run_builder("data_prep.arc", ["--challenges-file", str(path), "--output-dir", str(directory / "data"),
                                         "--num-aug", str(num_aug), "--quiet"],
                       "test-time training: building the new puzzles' versions", on_stderr=show)
  with open(directory / "data" / dataset_format.IDENTIFIERS_FILE) as f:
    return json.load(f)


def _epochs_per_pass(split_dir: pathlib.Path, batch_size: int) -> int:
  """Epochs per sampler pass so that every pass fills at least one batch (a few puzzles, a big batch)."""
  info = data_lib.load_dataset_info(split_dir.parent, split_dir.name)
  per_epoch = 0
  for s in info.sets.values():
    if s.num_groups:
      sizes = np.diff(s.puzzle_indices)
      per_epoch = max(per_epoch, int(np.minimum.reduceat(sizes, s.group_indices[:-1].astype(np.int64)).sum()))
  return max(1, math.ceil(batch_size / max(per_epoch, 1)))


# ---------------------------------------------------------------------------
# Training.


@dataclasses.dataclass
class Result:
  """The trained parameters and table, and what predict needs to vote with them."""
  params: Any  # the dense parameters after TTT (the run's own when only embeddings trained)
  table: jax.Array  # the run's rows, then the new ones (padded for the mesh)
  eval_fn: Any  # jitted eval step for this table's shape
  names: list[str]  # the new rows' puzzle names (row first_row + i is names[i])
  first_row: int
  report: dict[str, Any]


def run_ttt(run: runs.Run, params: Any, table: jax.Array, puzzles: Sequence[arc_data.Puzzle], s: Settings, *,
            started: float, predictions_after: Callable[[list[str]], int]) -> Result:
  """Trains rows for ``puzzles`` (and by ``s.mode`` the network); see the module docstring.

  ``started``: ``time.monotonic()`` when predict began (for ``time_budget_s``);
  ``predictions_after(new names)``: how many predictions the voting will make.
  """
  t_start = time.monotonic()
  is_main = jax.process_index() == 0
  config = run.config
  try:
    sharding.check_global_batch_size(s.batch_size, run.mesh)
  except ValueError as e:
    raise errors.UserError(f"config.ttt.batch_size: {e}") from None
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="trm-ttt-"))
  monitor = monitor_lib.Monitor(tmp, total_steps=s.steps, enabled=is_main, tensorboard=False)
  try:
    new_ids = _build_dataset(puzzles, tmp, s.num_aug)
    data_dir = tmp / "data"
    trained_rows = run.model.num_puzzle_identifiers
    first_row = trained_rows  # new identifier i > 0 -> row trained_rows - 1 + i
    names = new_ids[1:]
    rows = trained_rows + len(names)
    ttt_model = dataclasses.replace(run.model, num_puzzle_identifiers=rows)
    ttt_config = config.copy_and_resolve_references()
    ttt_config.global_batch_size = s.batch_size
    ttt_config.ema = False

    def ttt_run(embeddings_only: bool) -> runs.Run:
      opt = optim.make_optimizers(
          lr=s.lr, weight_decay=config.weight_decay, puzzle_emb_lr=s.puzzle_emb_lr,
          puzzle_emb_weight_decay=config.puzzle_emb_weight_decay, beta1=config.beta1, beta2=config.beta2,
          warmup_steps=s.warmup_steps, total_steps=max(s.steps, 1), lr_min_ratio=config.lr_min_ratio,
          grad_clip_norm=config.grad_clip_norm or None, freeze_weights=embeddings_only,
          trainable_mask=state_lib.trainable_mask)
      return dataclasses.replace(run, config=ttt_config, model=ttt_model, optimizers=opt, total_steps=s.steps)

    plan = phases(s)
    phase_runs = [ttt_run(embeddings_only) for _, _, embeddings_only in plan] or [ttt_run(True)]
    layouts = [runs.make_layout(r) for r in phase_runs]
    layout = layouts[0]
    padded = layout.abstract_state.puzzle_emb.shape[0]
    extend = jax.jit(lambda t: sharding.pad_table(state_lib.extend_puzzle_table(t, rows, trained_rows=trained_rows),
                                                  padded), out_shardings=layout.state_shardings.puzzle_emb)
    table = extend(table)
    eval_fn = evaluation.make_eval_fn(phase_runs[0], layout)

    row_of = {name: first_row + i for i, name in enumerate(names)}
    demo = demonstration_rows(puzzles, row_of)
    before, times = demonstration_metrics(phase_runs[0], eval_fn, params, table, demo)
    if s.time_budget_s and len(times) < 2:  # the only batch included the compilation: time one more
      _, more = demonstration_metrics(phase_runs[0], eval_fn, params, table, demo)
      times = times + more
    batch_s = float(np.median(times[1:] or times))
    bs = run.eval_batch_size
    vote_batches = math.ceil(predictions_after(names) / bs) + 2 * math.ceil(demo[0].shape[0] / bs)
    reserve_s = VOTE_TIME_FACTOR * vote_batches * batch_s + BUDGET_MARGIN_S
    deadline = started + s.time_budget_s if s.time_budget_s else math.inf

    if is_main:
      examples = data_lib.load_dataset_info(data_dir, "train").sets["all"].num_examples
      monitor.print(f"test-time training: {len(puzzles)} new puzzle(s), {len(names)} identifiers (num_aug "
                    f"{s.num_aug}), {examples} demonstration examples; mode {s.mode}, {s.steps} steps of "
                    f"{s.batch_size}" + (f", time budget {s.time_budget_s:.0f}s (voting reserve {reserve_s:.0f}s)"
                                         if s.time_budget_s else ""))
    params, table, done, stopped_by = _train(phase_runs, layouts, plan, params, table, data_dir, s, monitor,
                                             deadline=deadline, reserve_s=reserve_s, first_row=first_row)
    after, _ = demonstration_metrics(phase_runs[0], eval_fn, params, table, demo)
  finally:
    monitor.close()
    shutil.rmtree(tmp, ignore_errors=True)
  report = {"puzzles": len(puzzles), "identifiers": len(names), "mode": s.mode, "steps": done,
            "planned_steps": s.steps, "stopped_by": stopped_by, "seconds": round(time.monotonic() - t_start, 2),
            "eval_batch_seconds": round(batch_s, 4),
            "demonstrations_before": before, "demonstrations_after": after}
  return Result(params=params, table=table, eval_fn=eval_fn, names=names, first_row=first_row, report=report)


def _train(phase_runs, layouts, plan, params, table, data_dir: pathlib.Path, s: Settings, monitor, *, deadline: float,
           reserve_s: float, first_row: int) -> tuple[Any, jax.Array, int, str | None]:
  """The training phases; returns ``(dense params, table, steps done, stopped_by or None)``."""
  if not plan:
    return params, table, 0, None
  config = phase_runs[0].config
  mesh = phase_runs[0].mesh
  batch_sh = sharding.batch_sharding(mesh)
  offset = first_row - 1
  train_iter = data_lib.make_train_iterator(
      data_dir, global_batch_size=s.batch_size, seed=config.seed,
      epochs_per_iter=_epochs_per_pass(data_dir / "train", s.batch_size), process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.num_workers, prefetch=config.prefetch)
  step, stopped_by = 0, None
  window: list[Any] = []
  start_params = params
  state = carry = None
  try:
    for (first, end, _), r, layout in zip(plan, phase_runs, layouts):
      # The dense parameters are copied: the step donates its state, and the run's
      # own parameters are still needed (for the puzzles the run knows).
      copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=layout.state_shardings.params)
      if state is None:
        # Every field of the abstract state (from state.create_train_state) is replaced:
        # no initialisation to compile.
        state = layout.abstract_state.replace(
            puzzle_emb=table, ema_params=None,
            rng=jax.device_put(jax.random.split(jax.random.PRNGKey(config.seed))[1], layout.state_shardings.rng))
        carry = layout.create_carry()
        dense = copy(start_params)
      else:
        dense = state.params
      opt_state = jax.jit(r.optimizers.dense.init, out_shardings=layout.state_shardings.opt_state)(dense)
      state = state.replace(params=dense, opt_state=opt_state,
                            step=jax.device_put(jnp.asarray(step, jnp.int32), layout.state_shardings.step))
      train_step = jax.jit(
          steps.make_train_step(r.model, r.optimizers, s.batch_size, None),
          in_shardings=(layout.state_shardings, layout.carry_shardings, batch_sh),
          out_shardings=(layout.state_shardings, layout.carry_shardings, sharding.replicated(mesh)),
          donate_argnums=(0, 1))
      last_step_s = 0.0
      while step < end:
        if deadline != math.inf and _agreed(time.monotonic() + last_step_s + reserve_s > deadline):
          stopped_by = "time_budget"
          break
        t0 = time.monotonic()
        local = next(train_iter)
        ids = local["puzzle_identifiers"]
        local["puzzle_identifiers"] = np.where(ids > 0, ids + offset, 0).astype(ids.dtype)
        state, carry, metrics = train_step(state, carry, sharding.global_batch(local, mesh, s.batch_size))
        step += 1
        window.append(metrics)
        if deadline != math.inf:
          jax.block_until_ready(metrics)
          last_step_s = time.monotonic() - t0
        if len(window) >= config.log_every_steps or step == s.steps:
          _log_window(monitor, window, step, s.batch_size)
          window = []
      if stopped_by:
        break
    _log_window(monitor, window, step, s.batch_size)
  finally:
    train_iter.close()
  if stopped_by and monitor.enabled:
    monitor.print(f"test-time training stopped by the time budget after {step} of {s.steps} steps "
                  f"(keeping {reserve_s:.0f}s to vote)")
  return state.params, state.puzzle_emb, step, stopped_by


def _agreed(stop: bool) -> bool:
  """Whether any process wants to stop (every process must take the same number of steps)."""
  if jax.process_count() == 1:
    return stop
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))


def _log_window(monitor: monitor_lib.Monitor, window: list[Any], step: int, batch_size: int) -> None:
  """One progress line for the window's steps; a non-finite loss stops."""
  if not window:
    return
  fetched = jax.device_get(window)
  summed = None
  for m in fetched:
    summed = steps.sum_metrics(summed, m)
  reported = steps.train_metrics_to_host(summed, batch_size * len(fetched))
  loss = reported["lm_loss"] + reported["q_halt_loss"] + reported.get("q_continue_loss", 0.0)
  if not math.isfinite(loss):
    raise errors.NonFiniteLossError(f"test-time training: non-finite loss {loss} by step {step}; "
                                   "lower config.ttt.lr or config.ttt.puzzle_emb_lr")
  reported.update(lr=float(fetched[-1]["lr"]), puzzle_emb_lr=float(fetched[-1]["puzzle_emb_lr"]))
  monitor.log_train(step, reported)
