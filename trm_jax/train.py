"""The training loop: ``train_and_evaluate(config, workdir)``.

``trm_jax.runs.setup`` checks the config against the data and the devices
first; then the state is created sharded or restored from the latest
checkpoint, and the loop runs one jitted ``train_step`` per batch, evaluating
(``trm_jax.evaluation``) after every pass of ``eval_interval`` epochs
(SPEC §6, §9). Inference from a saved run is ``trm_jax.inference``.

Stopping: SIGTERM or SIGINT finish the current step, save a checkpoint and
return; re-running the same command resumes from it (bit-identical to an
uninterrupted run on a CPU). A non-finite loss raises ``NonFiniteLossError``
naming the step, without saving: the last good checkpoint stays the latest.
A failure the state survives (an unreadable train shard, an evaluation that
raises) saves first, so no training is lost; a checkpoint saved before its
evaluation failed is evaluated first on resume. The run holds a lock on its
directory (``trm_jax.workdir``) and restores only intact checkpoints
(``trm_jax.integrity``).

A depth curriculum (``config.depth_schedule``, ``trm_jax.curriculum``) picks
the step function by the step index: one jitted step per stage, compiled when
the stage starts (or the run resumes in it).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from trm_jax import dataset_format
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import data as data_lib
from trm_jax import evaluation
from trm_jax import monitor as monitor_lib
from trm_jax import runs
from trm_jax import sharding
from trm_jax import state as state_lib
from trm_jax import steps
from trm_jax import tasks
from trm_jax import workdir as workdir_lib
from trm_jax.errors import NonFiniteLossError
from trm_jax.errors import UserError


class _StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves and returns at the next step.

  With several processes the flag is agreed on (every ``every`` steps, so
  that all of them stop at the same step and write one checkpoint together).
  """

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def requested(self, step: int, every: int) -> bool:
    if jax.process_count() == 1:
      return self.signal is not None
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    signals = multihost_utils.process_allgather(np.asarray(self.signal or 0, np.int32))
    if self.signal is None and np.any(signals):
      self.signal = int(np.max(signals))
    return bool(np.any(signals))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _better(value: float, best: float | None, mode: str) -> bool:
  if value is None or not math.isfinite(value):
    return False
  return best is None or (value > best if mode == "max" else value < best)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) a run in ``workdir``; returns a summary of it."""
  run = runs.setup(config, workdir)
  workdir_lib.check(run.workdir, create=True)
  with workdir_lib.run_lock(run.workdir):
    return _train(run)


def _train(run: runs.Run) -> dict[str, Any]:
  config = run.config
  config_dict = checkpoint_lib.config_to_dict(config)
  is_main = jax.process_index() == 0
  checkpointer = checkpoint_lib.Checkpointer(run.workdir, keep=config.keep_checkpoints, keep_best=config.keep_best,
                                             repair=True)
  if is_main:
    for line in checkpointer.damaged:
      print(f"warning: {line}", file=sys.stderr, flush=True)
  layout = runs.make_layout(run)
  try:
    train_iter = data_lib.make_train_iterator(
        list(run.train_dirs), global_batch_size=config.global_batch_size, seed=config.seed,
        epochs_per_iter=config.eval_interval, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.num_workers, prefetch=config.prefetch)
  except ValueError as e:
    raise UserError(f"config: {e}") from None

  meta = {"iteration": 0, "best_metric": None, "best_step": None, "evaluated_step": None, "eval_pending": None}
  try:
    evaluators = tasks.make_evaluators(config.evaluators, run.test_dirs[0], run.test_info)
  except ValueError as e:
    raise UserError(str(e)) from None
  latest = checkpointer.latest_step()
  if latest is not None:
    saved = checkpointer.read_meta(latest)
    where = f"checkpoint {latest} in {run.workdir / 'checkpoints'}"
    checkpoint_lib.check_compatible(saved["config"], config_dict, where)
    checkpoint_lib.check_resume(saved, config_dict, runs.dataset_shapes(run), where)
    state, carry, data_state, saved = checkpointer.restore(layout.abstract_state, layout.abstract_carry, latest)
    try:
      train_iter.set_state(data_state)
    except ValueError as e:
      raise UserError(f"checkpoint {latest} in {run.workdir}: {e}") from None
    meta.update({k: saved[k] for k in meta if k in saved})
    for ev, ev_state in zip(evaluators, checkpointer.read_evaluators(latest) or []):
      ev.load_state(ev_state)
  else:
    state = layout.create_state()
    carry = layout.create_carry()
    if config.init_weights:
      state = runs.load_initial_weights(run, layout, state)

  batch_sh = sharding.batch_sharding(run.mesh)
  train_steps: dict[tuple[int, int], Any] = {}  # one jitted step per (H_cycles, L_cycles), built when first needed

  def train_step_at(step: int):
    """The jitted step of the depth stage in force at ``step`` (``config.model``'s without a schedule)."""
    model = run.model if run.depth_schedule is None else run.depth_schedule.stage(step).model
    key = (model.H_cycles, model.L_cycles)
    if key not in train_steps:
      if run.depth_schedule is not None and is_main:
        index = run.depth_schedule.stage_index(step)
        monitor.print(f"depth stage {index + 1}/{len(run.depth_schedule.stages)} at step {step}: "
                      f"H_cycles={key[0]}, L_cycles={key[1]}")
      train_steps[key] = jax.jit(
          steps.make_train_step(model, run.optimizers, config.global_batch_size,
                                config.ema_rate if config.ema else None, step_loss_decay=config.step_loss_decay),
          in_shardings=(layout.state_shardings, layout.carry_shardings, batch_sh),
          out_shardings=(layout.state_shardings, layout.carry_shardings, sharding.replicated(run.mesh)),
          donate_argnums=(0, 1))
    return train_steps[key]

  eval_fn = evaluation.make_eval_fn(run, layout)
  step = int(jax.device_get(state.step))
  stop_at = run.total_steps if not config.max_steps else min(run.total_steps, config.max_steps)
  already_complete = (latest is not None and meta["iteration"] >= run.total_iters
                      and not meta.get("eval_pending") and meta.get("evaluated_step") == step)
  # A finished run re-run writes nothing, not even an empty TensorBoard event file.
  monitor = monitor_lib.Monitor(run.workdir, total_steps=run.total_steps, enabled=is_main,
                                tensorboard=config.tensorboard and not already_complete)
  summary: dict[str, Any] = {"start_step": step, "total_steps": run.total_steps, "stopped_by": None,
                             "last_eval": None}
  if already_complete and meta.get("evaluated_step") is not None:
    summary["last_eval"] = evaluation.read_results(run.workdir / "eval" / f"step_{meta['evaluated_step']}")
  if is_main and not already_complete:
    # Pass lengths vary with the puzzles each pass picks, so the step count is the
    # schedule's estimate (total_steps, SPEC §6); the run ends after its passes.
    monitor.print(f"trm-jax: {run.model.arch} (D={run.model.hidden_size}), "
                  f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M dense params, "
                  f"{run.mesh.size} device(s) {dict(run.mesh.shape)}, {run.total_iters} pass(es) of "
                  f"{config.eval_interval} epochs, about {run.total_steps} steps"
                  + (f", resuming at step {step}" if latest is not None else ""))

  def save(best: bool = False):
    data_state = train_iter.get_state()
    checkpointer.save(step, state, carry, data_state,
                      {**meta, "config": config_dict, "step": step, "dataset": runs.dataset_shapes(run)},
                      evaluators=[ev.state() for ev in evaluators], best=best)

  def save_before_raising():
    """A failure the state survives (data, evaluation): keep the training done since the last save."""
    if jax.process_count() == 1 and checkpointer.latest_step() != step:
      check_window()  # never save a state whose loss went non-finite
      save()

  window: list[Mapping[str, jax.Array]] = []  # device metrics of the steps not logged yet
  window_start = step
  host_window: list[Mapping[str, Any]] = []  # the first len(host_window) of them, fetched and checked

  def check_window():
    """Metrics leave the device here only: every step's loss is checked before a save."""
    fetched = jax.device_get(window[len(host_window):])
    for i, m in enumerate(fetched):
      loss = float(m["lm_loss"]) + float(m["q_halt_loss"]) + float(m.get("q_continue_loss", 0.0))
      if not math.isfinite(loss):
        kept = checkpointer.latest_step()
        raise NonFiniteLossError(
            f"non-finite loss {loss} at step {window_start + len(host_window) + i + 1}; "
            + (f"the latest checkpoint (step {kept}) is the last good state" if kept is not None
               else "no checkpoint was saved before it") + "; lower --config.lr or --config.puzzle_emb_lr")
    host_window.extend(fetched)

  def flush_window():
    """Checks, then logs the mean of the window's steps (one progress line)."""
    nonlocal window, window_start, host_window
    if not window:
      return
    check_window()
    summed = None
    for m in host_window:
      summed = steps.sum_metrics(summed, m)
    reported = steps.train_metrics_to_host(summed, config.global_batch_size * len(host_window))
    reported.update(lr=float(host_window[-1]["lr"]), puzzle_emb_lr=float(host_window[-1]["puzzle_emb_lr"]))
    monitor.log_train(window_start + len(host_window), reported)
    window, window_start, host_window = [], window_start + len(host_window), []
    checkpointer.check()  # a background save that failed stops the run now

  def evaluate_and_save():
    try:
      results = evaluation.run_evaluation(run, eval_fn, state_lib.eval_params(state), state.puzzle_emb, evaluators,
                               step=step, monitor=monitor, output_dir=run.workdir / "eval" / f"step_{step}")
    except Exception:
      meta["eval_pending"] = step  # a resume evaluates this step first
      save_before_raising()
      raise
    meta["eval_pending"] = None
    evaluation.write_results(run.workdir / "eval" / f"step_{step}", results)
    summary["last_eval"] = results
    meta["evaluated_step"] = step
    value = results.get(config.best_metric)
    if value is None:
      monitor.print(f"warning: best_metric {config.best_metric!r} is not among the eval metrics {sorted(results)}")
    is_best = _better(value, meta["best_metric"], config.best_mode)
    if is_best:
      meta["best_metric"], meta["best_step"] = value, step
    save(best=is_best)

  try:
    if latest is not None and meta["eval_pending"] == step:
      evaluate_and_save()  # the evaluation this checkpoint was saved before did not finish
    with _StopRequest() as stop:
      while step < stop_at and meta["iteration"] < run.total_iters:
        try:
          local = next(train_iter)
        except dataset_format.DatasetFormatError:
          save_before_raising()
          raise
        pass_done = train_iter.batch_index == 0
        state, carry, metrics = train_step_at(step)(
            state, carry, sharding.global_batch(local, run.mesh, config.global_batch_size))
        step += 1
        window.append(metrics)
        if len(window) >= config.log_every_steps:
          flush_window()
        if pass_done:
          meta["iteration"] += 1
          if meta["iteration"] >= run.total_iters or step >= stop_at:
            flush_window()  # the last line comes before the final evaluation's
          else:
            # Checked, not logged: a line right after the evaluation would cover a few steps only.
            check_window()
          if meta["iteration"] > config.min_eval_interval or meta["iteration"] == run.total_iters:
            evaluate_and_save()
          else:
            save()
          monitor.resume(step)
        if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
          check_window()
          save()
        if stop.requested(step, every=config.log_every_steps):
          flush_window()
          save()
          summary["stopped_by"] = signal.Signals(stop.signal).name
          monitor.print(f"stopped by {summary['stopped_by']} at step {step}; checkpoint saved")
          break
      else:
        flush_window()
        schedule_done = step >= run.total_steps or meta["iteration"] >= run.total_iters
        if schedule_done and meta.get("evaluated_step") != step:
          # The last pass ended past total_steps (pass lengths vary): evaluate the final state.
          evaluate_and_save()
        elif checkpointer.latest_step() != step:
          save()
  except jax.errors.JaxRuntimeError as e:
    if runs.is_out_of_memory(e):
      raise runs.out_of_memory_error(config, run.mesh.size) from None
    raise
  finally:
    train_iter.close()
    checkpointer.close()
    monitor.close()
  summary.update(end_step=step, best_metric=meta["best_metric"], best_step=meta["best_step"])
  if is_main:
    monitor.print(_closing_line(run, summary, config.best_metric, already_complete=already_complete))
  return summary


def _closing_line(run: runs.Run, summary: Mapping[str, Any], best_metric: str, *, already_complete: bool) -> str:
  """What a finished (or stopped) run ends with: where it stands and where its files are."""
  if already_complete:
    head = f"the run in {run.workdir} is already complete (step {summary['end_step']}); nothing to do"
  elif summary["stopped_by"]:
    head = f"stopped at step {summary['end_step']}; re-run the same command to resume"
  else:
    head = f"done: step {summary['end_step']}"
  parts = [head]
  if summary.get("last_eval"):
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary["last_eval"].items()
                      if isinstance(v, (int, float)) and not k.endswith("/count"))
    parts.append(f"final eval: {shown}")
  if summary.get("best_step") is not None:
    parts.append(f"best checkpoint: step {summary['best_step']} ({best_metric} {summary['best_metric']:.4f}) "
                 f"in {run.workdir / 'best'}")
  parts.append(f"run directory: {run.workdir}")
  return "\n".join(parts)
