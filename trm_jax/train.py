"""The training loop: ``train_and_evaluate(config, workdir)`` and its siblings.

A run is built in two phases. ``setup`` checks everything a user can get
wrong (the dataset, the batch size against the devices, the schedule, a
checkpoint from another config) before anything is compiled, and raises a
``UserError`` naming the problem. Then the state is created sharded
(``eval_shape`` -> shardings -> jitted init) or restored from the latest
checkpoint, and the loop runs one jitted ``train_step`` per batch, evaluating
after every pass of ``eval_interval`` epochs (SPEC §6, §9).

Stopping: SIGTERM or SIGINT finish the current step, save a checkpoint and
return; re-running the same command resumes from it (bit-identical to an
uninterrupted run on a CPU). A non-finite loss raises ``NonFiniteLossError``
naming the step, without saving: the last good checkpoint stays the latest.
A failure the state survives (an unreadable train shard, an evaluation that
raises) saves first, so no training is lost; a checkpoint saved before its
evaluation failed is evaluated first on resume. The run holds a lock on its
directory (``trm_jax.workdir``) and restores only intact checkpoints
(``trm_jax.integrity``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_prep import common as data_common
from trm_jax import act
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import data as data_lib
from trm_jax import datasets
from trm_jax import evaluate as evaluate_lib
from trm_jax import init_weights as init_weights_lib
from trm_jax import models
from trm_jax import monitor as monitor_lib
from trm_jax import optim
from trm_jax import sharding
from trm_jax import state as state_lib
from trm_jax import steps
from trm_jax import weights
from trm_jax import workdir as workdir_lib


class UserError(Exception):
  """A mistake in the config, the data or the command line (reported without a traceback)."""


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or infinite."""


def is_out_of_memory(error: BaseException) -> bool:
  """Whether a JAX runtime error is the device running out of memory."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_error(config: ml_collections.ConfigDict, num_devices: int) -> UserError:
  """What to change when the step does not fit: the batch, remat or the kernels."""
  batch = config.global_batch_size
  return UserError(
      f"out of device memory at global_batch_size={batch} ({batch / num_devices:g} per device on {num_devices} "
      f"device(s)) with model.kernels={config.model.kernels!r} and model.remat={config.model.remat!r}. "
      f"Lower --config.global_batch_size, or save memory with --config.model.remat=network or "
      f"--config.model.kernels=pallas; `python -m trm_jax.bench --config=<this config> --find_max_batch` "
      f"finds the largest batch that fits. The latest checkpoint is intact.")


# Each is reported by launch.py as one line, exit status 2.
USER_ERRORS = (UserError, data_common.DatasetFormatError, checkpoint_lib.IncompatibleCheckpointError,
               checkpoint_lib.CheckpointSaveError, workdir_lib.WorkdirError, NonFiniteLossError)


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts JAX's distributed runtime for a multi-host run.

  From the flags when they are given (all three), else from the cluster
  environment when it describes several processes (``JAX_COORDINATOR_ADDRESS``,
  SLURM, Open MPI: ``jax.distributed.initialize()`` reads them); a single
  process needs nothing.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise UserError("multi-host: pass all of --coordinator_address, --num_processes and --process_id "
                      "(or none of them and let the cluster environment provide them)")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return
  tasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
  if "JAX_COORDINATOR_ADDRESS" in os.environ or tasks > 1:
    jax.distributed.initialize()


# ---------------------------------------------------------------------------
# Setup: everything that can fail because of the user, before any compilation.


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data_path: pathlib.Path
  train_info: data_common.SplitInfo | None
  test_info: data_common.SplitInfo | None
  model: models.ModelConfig
  mesh: jax.sharding.Mesh
  optimizers: optim.Optimizers
  total_steps: int
  total_iters: int
  eval_batch_size: int


def model_config(config: ml_collections.ConfigDict, metadata: data_common.DatasetMetadata) -> models.ModelConfig:
  """The model config: ``config.model`` plus the dataset's sizes."""
  fields = dict(config.model.to_dict())
  fields.update(seq_len=metadata.seq_len, vocab_size=metadata.vocab_size,
                num_puzzle_identifiers=metadata.num_puzzle_identifiers)
  try:
    return models.config_from_dict(fields)
  except ValueError as e:
    raise UserError(str(e).replace("model config: ", "config.model.")) from None


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  if config.epochs < 1 or config.eval_interval < 1:
    raise UserError(f"epochs={config.epochs} and eval_interval={config.eval_interval} must be >= 1")
  if config.epochs % config.eval_interval:
    raise UserError(f"eval_interval={config.eval_interval} does not divide epochs={config.epochs}")
  if config.global_batch_size < 1:
    raise UserError(f"global_batch_size={config.global_batch_size} must be >= 1")
  if config.best_mode not in ("max", "min"):
    raise UserError(f"best_mode={config.best_mode!r}: expected 'max' or 'min'")
  if config.log_every_steps < 1:
    raise UserError(f"log_every_steps={config.log_every_steps} must be >= 1")


def _load_split(path: pathlib.Path, split: str) -> data_common.SplitInfo:
  try:
    return data_lib.load_dataset_info(path, split)
  except data_common.DatasetFormatError as e:
    raise UserError(f"dataset {path}: {e}") from None


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, need_train: bool = True,
          need_test: bool = True) -> Run:
  """Validates the config against the data and the devices; builds nothing on device."""
  _check_schedule(config)
  workdir = workdir_lib.check(workdir, create=False)
  try:
    data_path = datasets.ensure_dataset(config)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not data_path.is_dir():
    raise UserError(f"data_path {str(data_path)!r} does not exist; build it with data_prep "
                    "(see README) or set config.data_build")
  train_info = _load_split(data_path, "train") if need_train else None
  test_info = _load_split(data_path, "test") if need_test else None
  metadata = (train_info or test_info).metadata
  if train_info is not None and test_info is not None:
    a, b = train_info.metadata, test_info.metadata
    if (a.seq_len, a.vocab_size, a.num_puzzle_identifiers) != (b.seq_len, b.vocab_size, b.num_puzzle_identifiers):
      raise UserError(f"dataset {data_path}: train and test disagree on seq_len/vocab_size/num_puzzle_identifiers")
  model = model_config(config, metadata)
  try:
    mesh = sharding.make_mesh(sharding.MeshShape(**config.mesh.to_dict()))
    sharding.check_global_batch_size(config.global_batch_size, mesh)
    eval_batch_size = config.eval_batch_size or config.global_batch_size
    sharding.check_global_batch_size(eval_batch_size, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None
  if config.param_sharding not in sharding.PARAM_SHARDINGS:
    raise UserError(f"param_sharding={config.param_sharding!r}: expected one of {sharding.PARAM_SHARDINGS}")
  if train_info is not None:
    total_steps = optim.total_train_steps(config.epochs, train_info.metadata.total_groups,
                                          train_info.metadata.mean_puzzle_examples, config.global_batch_size)
    if total_steps < 1:
      raise UserError(f"the schedule has no step: epochs={config.epochs} x {train_info.metadata.total_groups} "
                      f"groups x {train_info.metadata.mean_puzzle_examples:.3g} examples < "
                      f"global_batch_size={config.global_batch_size}")
  else:
    total_steps = 1
  optimizers = optim.make_optimizers(
      lr=config.lr, weight_decay=config.weight_decay, puzzle_emb_lr=config.puzzle_emb_lr,
      puzzle_emb_weight_decay=config.puzzle_emb_weight_decay, beta1=config.beta1, beta2=config.beta2,
      warmup_steps=config.lr_warmup_steps, total_steps=total_steps, lr_min_ratio=config.lr_min_ratio,
      grad_clip_norm=config.grad_clip_norm or None, freeze_weights=config.freeze_weights,
      trainable_mask=state_lib.trainable_mask)
  return Run(config=config, workdir=pathlib.Path(workdir), data_path=data_path, train_info=train_info,
             test_info=test_info, model=model, mesh=mesh, optimizers=optimizers, total_steps=total_steps,
             total_iters=config.epochs // config.eval_interval, eval_batch_size=eval_batch_size)


# ---------------------------------------------------------------------------
# State: created sharded, or restored onto this mesh.


def _zeros_batch(model: models.ModelConfig, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {"inputs": jnp.zeros((batch_size, model.seq_len), jnp.int32),
          "labels": jnp.zeros((batch_size, model.seq_len), jnp.int32),
          "puzzle_identifiers": jnp.zeros((batch_size,), jnp.int32)}


@dataclasses.dataclass
class Layout:
  """Abstract trees and shardings of the state and the carry on a mesh."""
  state_shardings: Any
  carry_shardings: Any
  abstract_state: Any
  abstract_carry: Any
  create_state: Any  # () -> TrainState, jitted with out_shardings
  create_carry: Any  # () -> Carry, jitted with out_shardings


def make_layout(run: Run) -> Layout:
  model, mesh, config = run.model, run.mesh, run.config
  rows = sharding.padded_table_rows(model.num_puzzle_identifiers, mesh)

  def create_state():
    return state_lib.create_train_state(model, run.optimizers, config.seed, ema=config.ema, puzzle_emb_rows=rows)

  def create_carry():
    return act.initial_carry(model, _zeros_batch(model, config.global_batch_size))

  abstract_state = jax.eval_shape(create_state)
  abstract_carry = jax.eval_shape(create_carry)
  state_sh = sharding.state_shardings(abstract_state, mesh, config.param_sharding)
  carry_sh = sharding.carry_shardings(abstract_carry, mesh)

  def with_sharding(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  return Layout(state_sh, carry_sh, with_sharding(abstract_state, state_sh),
                with_sharding(abstract_carry, carry_sh),
                jax.jit(create_state, out_shardings=state_sh), jax.jit(create_carry, out_shardings=carry_sh))


def load_initial_weights(run: Run, layout: Layout, state: state_lib.TrainState) -> state_lib.TrainState:
  """``config.init_weights``: original-named weights (.npz or the original's torch.save file) replace the initial ones.

  A puzzle table of another row count is reset as the original does (see ``init_weights``).
  """
  try:
    params, table, notices = init_weights_lib.load(run.model, run.config.init_weights)
  except ValueError as e:
    raise UserError(str(e)) from None
  if jax.process_index() == 0:
    for notice in notices:
      print(f"note: {notice}", flush=True)
  table = sharding.pad_table(table, state.puzzle_emb.shape[0])
  params = jax.device_put(params, layout.state_shardings.params)
  puzzle_emb = jax.device_put(table, layout.state_shardings.puzzle_emb)
  opt_state = jax.jit(run.optimizers.dense.init, out_shardings=layout.state_shardings.opt_state)(params)
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  return state.replace(params=params, puzzle_emb=puzzle_emb, opt_state=opt_state, ema_params=ema)


# ---------------------------------------------------------------------------
# Evaluation.


def _to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on this host (gathered across processes when needed)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_evaluation(run: Run, eval_fn, params: Any, puzzle_emb: jax.Array, evaluators: list[Any], *,
                   step: int, monitor: monitor_lib.Monitor | None = None,
                   output_dir: pathlib.Path | None = None) -> dict[str, float]:
  """Every test batch through ``halt_max_steps`` calls; per-set metrics and the evaluators."""
  config = run.config
  for ev in evaluators:
    ev.begin_eval()
  per_set: dict[str, dict[str, Any]] = {}
  image_batch = None
  test_iter = data_lib.make_test_iterator(
      run.data_path, global_batch_size=run.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.num_workers, prefetch=config.prefetch)
  with test_iter:
    for item in test_iter:
      batch = sharding.global_batch(item.batch, run.mesh, run.eval_batch_size)
      metrics, outputs = eval_fn(params, puzzle_emb, batch)
      per_set[item.set_name] = steps.sum_metrics(per_set.get(item.set_name), metrics)
      if evaluators or image_batch is None:
        host = {"inputs": _to_host(batch["inputs"]), "labels": _to_host(batch["labels"]),
                "puzzle_identifiers": _to_host(batch["puzzle_identifiers"]),
                "preds": _to_host(outputs["preds"]), "q_halt_logits": _to_host(outputs["q_halt_logits"])}
        real = item.num_examples
        host = {k: v[:real] for k, v in host.items()}
        for ev in evaluators:
          ev.update(item.set_name, host)
        if image_batch is None:
          image_batch = host
  results: dict[str, float] = {}
  for set_name, summed in per_set.items():
    for k, v in steps.eval_metrics_to_host(summed).items():
      results[f"{set_name}/{k}"] = v
  for ev in evaluators:
    results.update(ev.result(output_dir))
  if monitor is not None:
    monitor.log_eval(step, results)
    if image_batch is not None and config.num_image_samples > 0:
      n = config.num_image_samples
      kind = monitor_lib.grid_kind(run.model.seq_len, run.model.vocab_size)
      panel = monitor_lib.prediction_panel(image_batch["inputs"][:n], image_batch["preds"][:n],
                                           image_batch["labels"][:n], kind)
      monitor.log_images(step, "eval/predictions", panel)
  return results


def make_eval_fn(run: Run, layout: Layout):
  batch_sh = sharding.batch_sharding(run.mesh)
  params_sh = layout.state_shardings.params
  return jax.jit(lambda p, t, b: steps.eval_step(p, t, b, model=run.model),
                 in_shardings=(params_sh, layout.state_shardings.puzzle_emb, batch_sh),
                 out_shardings=(sharding.replicated(run.mesh), batch_sh))


# ---------------------------------------------------------------------------
# Training.


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


def _dataset_shapes(run: Run) -> dict[str, int]:
  return {"seq_len": run.model.seq_len, "vocab_size": run.model.vocab_size,
          "num_puzzle_identifiers": run.model.num_puzzle_identifiers}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) a run in ``workdir``; returns a summary of it."""
  run = setup(config, workdir)
  workdir_lib.check(run.workdir, create=True)
  with workdir_lib.run_lock(run.workdir):
    return _train(run)


def _train(run: Run) -> dict[str, Any]:
  config = run.config
  config_dict = checkpoint_lib.config_to_dict(config)
  is_main = jax.process_index() == 0
  checkpointer = checkpoint_lib.Checkpointer(run.workdir, keep=config.keep_checkpoints, keep_best=config.keep_best,
                                             repair=True)
  if is_main:
    for line in checkpointer.damaged:
      print(f"warning: {line}", file=sys.stderr, flush=True)
  layout = make_layout(run)
  try:
    train_iter = data_lib.make_train_iterator(
        run.data_path, global_batch_size=config.global_batch_size, seed=config.seed,
        epochs_per_iter=config.eval_interval, process_index=jax.process_index(),
        process_count=jax.process_count(), num_workers=config.num_workers, prefetch=config.prefetch)
  except ValueError as e:
    raise UserError(f"config: {e}") from None

  meta = {"iteration": 0, "best_metric": None, "best_step": None, "evaluated_step": None, "eval_pending": None}
  try:
    evaluators = evaluate_lib.make_evaluators(config, run.data_path, run.test_info)
  except ValueError as e:
    raise UserError(str(e)) from None
  latest = checkpointer.latest_step()
  if latest is not None:
    saved = checkpointer.read_meta(latest)
    where = f"checkpoint {latest} in {run.workdir / 'checkpoints'}"
    checkpoint_lib.check_compatible(saved["config"], config_dict, where)
    checkpoint_lib.check_resume(saved, config_dict, _dataset_shapes(run), where)
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
      state = load_initial_weights(run, layout, state)

  batch_sh = sharding.batch_sharding(run.mesh)
  train_step = jax.jit(
      steps.make_train_step(run.model, run.optimizers, config.global_batch_size,
                            config.ema_rate if config.ema else None),
      in_shardings=(layout.state_shardings, layout.carry_shardings, batch_sh),
      out_shardings=(layout.state_shardings, layout.carry_shardings, sharding.replicated(run.mesh)),
      donate_argnums=(0, 1))
  eval_fn = make_eval_fn(run, layout)
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
    summary["last_eval"] = _read_results(run.workdir / "eval" / f"step_{meta['evaluated_step']}")
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
                      {**meta, "config": config_dict, "step": step, "dataset": _dataset_shapes(run)},
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
      results = run_evaluation(run, eval_fn, state_lib.eval_params(state), state.puzzle_emb, evaluators,
                               step=step, monitor=monitor, output_dir=run.workdir / "eval" / f"step_{step}")
    except Exception:
      meta["eval_pending"] = step  # a resume evaluates this step first
      save_before_raising()
      raise
    meta["eval_pending"] = None
    _write_results(run.workdir / "eval" / f"step_{step}", results)
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
        except data_common.DatasetFormatError:
          save_before_raising()
          raise
        pass_done = train_iter.batch_index == 0
        state, carry, metrics = train_step(state, carry,
                                           sharding.global_batch(local, run.mesh, config.global_batch_size))
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
    if is_out_of_memory(e):
      raise out_of_memory_error(config, run.mesh.size) from None
    raise
  finally:
    train_iter.close()
    checkpointer.close()
    monitor.close()
  summary.update(end_step=step, best_metric=meta["best_metric"], best_step=meta["best_step"])
  if is_main:
    monitor.print(_closing_line(run, summary, config.best_metric, already_complete=already_complete))
  return summary


def _closing_line(run: Run, summary: Mapping[str, Any], best_metric: str, *, already_complete: bool) -> str:
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


def _read_results(directory: pathlib.Path) -> dict[str, float] | None:
  """The ``results.json`` an evaluation wrote, or None."""
  try:
    return json.loads((directory / "results.json").read_text())
  except (OSError, ValueError):
    return None


def _write_results(directory: pathlib.Path, results: Mapping[str, float]) -> None:
  if jax.process_index() != 0:
    return
  directory.mkdir(parents=True, exist_ok=True)
  data_common.write_json(directory / "results.json", dict(results))


# ---------------------------------------------------------------------------
# Evaluation and prediction from a checkpoint.


def restore_for_inference(run: Run, layout: Layout, checkpoint: str | int = "latest"
                          ) -> tuple[Any, jax.Array, int]:
  """``(eval params, puzzle table, step)`` of a run's checkpoint: 'latest', 'best' or a step.

  Reads only: a missing run directory is an error (nothing is created), and a
  damaged checkpoint is passed over for the newest intact one (with a warning).
  """
  if not run.workdir.is_dir():
    raise UserError(f"workdir {run.workdir} does not exist: no run to read a checkpoint from")
  checkpointer = checkpoint_lib.Checkpointer(run.workdir, keep=run.config.keep_checkpoints,
                                             keep_best=True, async_save=False, read_only=True)
  if jax.process_index() == 0:
    for line in checkpointer.damaged:
      print(f"warning: {line}", file=sys.stderr, flush=True)
  try:
    from_best = checkpoint == "best"
    if from_best:
      step = checkpointer.best_step()
    elif checkpoint == "latest":
      step = checkpointer.latest_step()
    else:
      try:
        step = int(checkpoint)
      except ValueError:
        raise UserError(f"--checkpoint={checkpoint!r}: expected 'latest', 'best' or a step number") from None
      if step not in checkpointer.latest.all_steps():
        raise UserError(f"no checkpoint at step {step} in {run.workdir / 'checkpoints'} "
                        f"(have {checkpointer.latest.all_steps()})")
      if step > (checkpointer.latest_step() or -1):
        raise UserError(f"checkpoint {step} in {run.workdir / 'checkpoints'} is damaged (see the warning above)")
    if step is None:
      raise UserError(f"no {checkpoint} checkpoint in {run.workdir}")
    saved = checkpointer.read_meta(step, from_best=from_best)
    checkpoint_lib.check_compatible(saved["config"], checkpoint_lib.config_to_dict(run.config),
                                    f"checkpoint {step} in {run.workdir}")
    state, _, _, _ = checkpointer.restore(layout.abstract_state, layout.abstract_carry, step, from_best=from_best)
  finally:
    checkpointer.close()
  return state_lib.eval_params(state), state.puzzle_emb, step


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                        checkpoint: str | int = "latest") -> dict[str, float]:
  """Evaluates a saved checkpoint on the test split; writes ``eval/ckpt_<step>/results.json``."""
  run = setup(config, workdir, need_train=False)
  layout = make_layout(run)
  params, table, step = restore_for_inference(run, layout, checkpoint)
  try:
    evaluators = evaluate_lib.make_evaluators(config, run.data_path, run.test_info)
  except ValueError as e:
    raise UserError(str(e)) from None
  monitor = monitor_lib.Monitor(run.workdir, total_steps=step, enabled=jax.process_index() == 0,
                                tensorboard=False)
  out_dir = run.workdir / "eval" / f"ckpt_{step}"
  results = run_evaluation(run, make_eval_fn(run, layout), params, table, evaluators, step=step,
                           monitor=monitor, output_dir=out_dir)
  _write_results(out_dir, results)
  monitor.close()
  return results


def predict(config: ml_collections.ConfigDict, workdir: str | os.PathLike, input_path: str | os.PathLike,
            output_path: str | os.PathLike | None = None, checkpoint: str | int = "latest") -> dict[str, Any]:
  """ARC: a challenges JSON in, ``submission.json`` out, with test-time training of the puzzles
  the run never saw (``config.ttt``; see ``trm_jax.predict`` and ``trm_jax.ttt``)."""
  from trm_jax import predict as predict_lib  # pylint: disable=g-import-not-at-top
  from trm_jax import ttt  # pylint: disable=g-import-not-at-top
  started = time.monotonic()
  run = setup(config, workdir, need_train=False)
  if monitor_lib.grid_kind(run.model.seq_len, run.model.vocab_size) != "arc":
    raise UserError(f"--mode=predict needs an ARC dataset (seq_len 900, vocab 12); {run.data_path} has "
                    f"seq_len {run.model.seq_len}, vocab {run.model.vocab_size}")
  ttt.settings(config)  # a wrong config.ttt key fails before anything is loaded
  puzzles = predict_lib.load_challenges(pathlib.Path(input_path))
  layout = make_layout(run)
  params, table, step = restore_for_inference(run, layout, checkpoint)
  output_path = pathlib.Path(output_path) if output_path else run.workdir / "predict" / "submission.json"
  return predict_lib.predict_arc(run, make_eval_fn(run, layout), params, table, puzzles, output_path,
                                 step=step, started=started)


def export_weights(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   output_path: str | os.PathLike | None = None, checkpoint: str | int = "latest") -> pathlib.Path:
  """Writes a checkpoint's weights (the EMA copy when enabled) in the original's state-dict naming.

  The ``.npz`` loads into the PyTorch code (``torch.from_numpy`` per entry)
  and back into this one with ``config.init_weights``.
  """
  run = setup(config, workdir, need_train=False)
  layout = make_layout(run)
  params, table, step = restore_for_inference(run, layout, checkpoint)
  params = jax.tree.map(_to_host, params)
  table = _to_host(table)[:run.model.num_puzzle_identifiers]
  state = weights.export_state_dict(run.model, params, table)
  path = pathlib.Path(output_path) if output_path else run.workdir / "export" / f"weights_step_{step}.npz"
  if jax.process_index() == 0:
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(tmp, **state)
      tmp.rename(path)
    except OSError as e:
      raise UserError(f"--output {path}: cannot write it ({e.strerror or e}"
                      + (f": {e.filename}" if e.filename else "") + ")") from None
    print(f"exported {len(state)} weights of step {step} to {path}", flush=True)
  return path
