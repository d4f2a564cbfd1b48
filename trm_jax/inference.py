"""Inference from a saved run: ``--mode=eval``, ``--mode=predict`` and ``--mode=export``.

Each reads a run's checkpoint ('latest', 'best' or a step) without changing
the run directory's checkpoints, on whatever devices this process has.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from trm_jax import checkpoint as checkpoint_lib
from trm_jax import evaluation
from trm_jax import monitor as monitor_lib
from trm_jax import runs
from trm_jax import state as state_lib
from trm_jax import tasks
from trm_jax import weights
from trm_jax.errors import UserError


def restore_for_inference(run: runs.Run, layout: runs.Layout, checkpoint: str | int = "latest"
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
  """Evaluates a saved checkpoint on the test split; writes ``eval/ckpt_<step>[_<options>]/results.json``
  (``<options>``: ``config.eval_*`` settings other than the original's, see ``trm_jax.test_time``)."""
  run = runs.setup(config, workdir, need_train=False)
  layout = runs.make_layout(run)
  params, table, step = restore_for_inference(run, layout, checkpoint)
  try:
    evaluators = tasks.make_evaluators(config.evaluators, run.test_dirs[0], run.test_info)
  except ValueError as e:
    raise UserError(str(e)) from None
  monitor = monitor_lib.Monitor(run.workdir, total_steps=step, enabled=jax.process_index() == 0,
                                tensorboard=False)
  # Evaluations of one checkpoint with other test-time options go to their own directories.
  tag = run.eval_options.tag
  out_dir = run.workdir / "eval" / (f"ckpt_{step}_{tag}" if tag else f"ckpt_{step}")
  results = evaluation.run_evaluation(run, evaluation.make_eval_fn(run, layout), params, table, evaluators, step=step,
                           monitor=monitor, output_dir=out_dir)
  evaluation.write_results(out_dir, results)
  monitor.close()
  return results


def predict(config: ml_collections.ConfigDict, workdir: str | os.PathLike, input_path: str | os.PathLike,
            output_path: str | os.PathLike | None = None, checkpoint: str | int = "latest") -> dict[str, Any]:
  """The task's prediction (``Task.predictor``; ARC: a challenges JSON in, ``submission.json`` out,
  with test-time training of the puzzles the run never saw: ``trm_jax.predict``, ``trm_jax.ttt``)."""
  started = time.monotonic()
  run = runs.setup(config, workdir, need_train=False)
  if run.task.predictor is None:
    able = tuple(t.name for t in tasks.TASKS.values() if t.predictor)
    raise UserError(f"--mode=predict: {run.data_path} holds the {run.task.name!r} task, which has no prediction "
                    f"mode (tasks with one: {able})")
  if len(run.train_dirs) > 1:
    raise UserError(f"--mode=predict maps puzzles through one dataset's identifiers.json, but data_path lists "
                    f"{len(run.train_dirs)} directories")
  predictor = importlib.import_module(run.task.predictor)
  prepared = predictor.prepare(config, pathlib.Path(input_path))  # config and input errors before any loading
  layout = runs.make_layout(run)
  params, table, step = restore_for_inference(run, layout, checkpoint)
  output_path = pathlib.Path(output_path) if output_path else run.workdir / "predict" / "submission.json"
  return predictor.predict(run, evaluation.make_eval_fn(run, layout), params, table, prepared, output_path,
                           step=step, started=started)


def export_weights(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   output_path: str | os.PathLike | None = None, checkpoint: str | int = "latest") -> pathlib.Path:
  """Writes a checkpoint's weights (the EMA copy when enabled) in the original's state-dict naming.

  The ``.npz`` loads into the PyTorch code (``torch.from_numpy`` per entry)
  and back into this one with ``config.init_weights``.
  """
  run = runs.setup(config, workdir, need_train=False)
  layout = runs.make_layout(run)
  params, table, step = restore_for_inference(run, layout, checkpoint)
  params = jax.tree.map(evaluation.to_host, params)
  table = evaluation.to_host(table)[:run.model.num_puzzle_identifiers]
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
