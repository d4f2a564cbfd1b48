"""Evaluation of a state on the test split: the jitted eval function and the loop over test batches.

Used by the training loop after each pass and by ``--mode=eval``/``predict``
(``trm_jax.inference``). Every test batch goes through ``halt_max_steps``
calls (SPEC §9), or as the run's evaluation options say (trajectories,
halting: ``trm_jax.test_time``); per-set metrics and the configured
evaluators' results come back as one flat dict, written to ``results.json``
beside the evaluators' files.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping

import jax
import numpy as np

from trm_jax import dataset_format
from trm_jax import data as data_lib
from trm_jax import monitor as monitor_lib
from trm_jax import runs
from trm_jax import sharding
from trm_jax import steps
from trm_jax import test_time


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on this host (gathered across processes when needed)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_evaluation(run: runs.Run, eval_fn, params: Any, puzzle_emb: jax.Array, evaluators: list[Any], *,
                   step: int, monitor: monitor_lib.Monitor | None = None,
                   output_dir: pathlib.Path | None = None) -> dict[str, float]:
  """Every test batch through ``halt_max_steps`` calls; per-set metrics and the evaluators."""
  config = run.config
  for ev in evaluators:
    ev.begin_eval()
  per_set: dict[str, dict[str, Any]] = {}
  image_batch = None
  test_iter = data_lib.make_test_iterator(
      list(run.test_dirs), global_batch_size=run.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), num_workers=config.num_workers, prefetch=config.prefetch)
  with test_iter:
    for item in test_iter:
      batch = sharding.global_batch(item.batch, run.mesh, run.eval_batch_size)
      metrics, outputs = eval_fn(params, puzzle_emb, batch)
      per_set[item.set_name] = steps.sum_metrics(per_set.get(item.set_name), metrics)
      if evaluators or image_batch is None:
        host = {"inputs": to_host(batch["inputs"]), "labels": to_host(batch["labels"]),
                "puzzle_identifiers": to_host(batch["puzzle_identifiers"]),
                "preds": to_host(outputs["preds"]), "q_halt_logits": to_host(outputs["q_halt_logits"])}
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
      panel = monitor_lib.prediction_panel(image_batch["inputs"][:n], image_batch["preds"][:n],
                                           image_batch["labels"][:n], run.task.draw)
      monitor.log_images(step, "eval/predictions", panel)
  return results


def make_eval_fn(run: runs.Run, layout: runs.Layout):
  """The jitted ``(params, puzzle_emb, batch) -> (metrics, outputs)`` of the run's evaluation options."""
  batch_sh = sharding.batch_sharding(run.mesh)
  params_sh = layout.state_shardings.params
  eval_step = test_time.make_eval_step(run.model, run.eval_options, batch_sharding=batch_sh)
  return jax.jit(eval_step,
                 in_shardings=(params_sh, layout.state_shardings.puzzle_emb, batch_sh),
                 out_shardings=(sharding.replicated(run.mesh), batch_sh))


def read_results(directory: pathlib.Path) -> dict[str, float] | None:
  """The ``results.json`` an evaluation wrote, or None."""
  try:
    return json.loads((directory / "results.json").read_text())
  except (OSError, ValueError):
    return None


def write_results(directory: pathlib.Path, results: Mapping[str, float]) -> None:
  if jax.process_index() != 0:
    return
  directory.mkdir(parents=True, exist_ok=True)
  dataset_format.write_json(directory / "results.json", dict(results))
