"""ARC prediction, the ARC task's ``--mode=predict``: a challenges JSON in, ``submission.json`` out (SPEC §9).

TRM learns one puzzle embedding per puzzle version (the original and its
dihedral x colour augmentations), so a puzzle can be predicted well only if
its versions have rows of the table. For every puzzle of the challenges file,
each version of it in the run's ``identifiers.json`` gets its test inputs
transformed the same way and placed on the canvas; the predictions are then
cropped, un-augmented and voted on exactly as in evaluation.

A puzzle the run never saw first gets rows of its own, trained on its
demonstration pairs (``trm_jax.ttt``, ``config.ttt``), and is then voted on
over its augmented versions like the others. With ``config.ttt.steps=0`` it
is predicted once, untransformed, with the blank embedding, and counted in a
warning.

If a solutions file sits beside the challenges (``..._solutions.json``),
pass@K is reported too. The submission is written to a temporary file beside
``--output`` and renamed when complete: a failed predict changes nothing.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from trm_jax import dataset_format
from trm_jax import errors
from trm_jax import tasks
from trm_jax import ttt
from trm_jax.tasks import arc as arc_data
from trm_jax.tasks import arc_eval
from trm_jax.tasks import dihedral


def _solutions_beside(challenges: pathlib.Path) -> pathlib.Path | None:
  """``<x>_solutions.json`` beside ``<x>_challenges.json`` (either may be ``.xz``-compressed)."""
  name = challenges.name.removesuffix(".xz")
  if name.endswith("_challenges.json"):
    sibling = challenges.with_name(name[:-len("_challenges.json")] + "_solutions.json")
    if dataset_format.input_exists(sibling):
      return dataset_format.input_path(sibling)
  return None


def versions_by_puzzle(identifiers: list[str]) -> dict[str, list[tuple[int, int, np.ndarray | None]]]:
  """Original puzzle id -> ``[(identifier, dihedral id, colour map or None)]`` of its versions."""
  out: dict[str, list[tuple[int, int, np.ndarray | None]]] = {}
  for identifier, name in enumerate(identifiers):
    if identifier == 0:
      continue  # <blank>
    orig, tid, mapping = arc_data.parse_aug_name(name)
    out.setdefault(orig, []).append((identifier, tid, mapping))
  return out


def load_challenges(input_path: pathlib.Path) -> list[arc_data.Puzzle]:
  """The puzzles of a challenges file (with the solutions beside it, when there are); UserError if bad."""
  if not dataset_format.input_exists(input_path):
    raise errors.UserError(f"{input_path}: challenges file not found (--input)")
  files = arc_data.SubsetFiles("challenges", input_path, _solutions_beside(input_path))
  try:
    return arc_data.load_subset(files, is_test_set=True, allow_missing_test_solutions=True,
                                limit_puzzles=None, warnings=arc_data.WarningCounter())
  except arc_data.ArcDataError as e:
    raise errors.UserError(str(e)) from None


def arc_settings(config: Any) -> dict[str, Any]:
  """The voting settings: the first ``arc`` entry of ``config.evaluators``, else the ``arc`` defaults."""
  for _, kind, settings in tasks.evaluator_settings(config.evaluators):
    if kind is arc_eval.EVALUATOR:
      return settings
  return dict(arc_eval.DEFAULTS)


def prepare(config: Any, input_path: pathlib.Path) -> list[arc_data.Puzzle]:
  """Checks ``config.ttt`` and the evaluators' settings, then reads the challenges (UserError if bad)."""
  ttt.settings(config)
  arc_settings(config)
  return load_challenges(input_path)


def _rows(puzzles: list[arc_data.Puzzle], versions: dict[str, list[tuple[int, int, np.ndarray | None]]]
          ) -> tuple[list[int], list[np.ndarray]]:
  """(table row, input canvas) of every version of every test input."""
  ids, canvases = [], []
  for puzzle in puzzles:
    test_inputs = [inp for (inp, _), to_test in zip(puzzle.pairs, puzzle.to_test) if to_test]
    for identifier, tid, mapping in versions[puzzle.id]:
      for grid in test_inputs:
        mapped = grid if mapping is None else mapping[grid]
        canvases.append(arc_data.grid_canvas(dihedral.dihedral_transform(mapped, tid)).reshape(-1))
        ids.append(identifier)
  return ids, canvases


def predict(run: Any, eval_fn, params: Any, table: jax.Array, puzzles: list[arc_data.Puzzle],
                output_path: pathlib.Path, *, step: int, started: float) -> dict[str, Any]:
  """Trains the new puzzles (``config.ttt``), runs the model on every version of every test
  input and writes the voted submission. ``started``: ``time.monotonic()`` at the start."""
  settings = ttt.settings(run.config)
  with open(run.data_path / dataset_format.IDENTIFIERS_FILE) as f:
    identifiers = json.load(f)
  versions = versions_by_puzzle(identifiers)
  known = [p for p in puzzles if versions.get(p.id)]
  unknown = [p for p in puzzles if not versions.get(p.id)]

  # Passes: (params, table, eval step, table rows, input canvases). The evaluator's
  # identifiers.json is the run's, then the names of the new puzzles' rows.
  eval_identifiers = list(identifiers)
  known_ids, known_canvases = _rows(known, versions)
  passes = []
  ttt_report = None
  if unknown and settings.steps > 0:
    def predictions_after(names):
      new_versions = versions_by_puzzle(["<blank>"] + names)
      return len(known_canvases) + sum(len(new_versions[p.id]) * sum(p.to_test) for p in unknown)

    result = ttt.run_ttt(run, params, table, unknown, settings, started=started,
                         predictions_after=predictions_after)
    ttt_report = result.report
    eval_identifiers += result.names
    new_versions = {name: [(row + result.first_row - 1, tid, mapping) for row, tid, mapping in v]
                    for name, v in versions_by_puzzle(["<blank>"] + result.names).items()}
    new_ids, new_canvases = _rows(unknown, new_versions)
    # The run's rows are unchanged in the extended table; the puzzles the run knows keep the
    # run's own dense parameters (the same ones when only embeddings trained).
    if settings.mode == "embeddings":
      passes.append((result.params, result.table, result.eval_fn, known_ids + new_ids, known_canvases + new_canvases))
    else:
      passes.append((params, result.table, result.eval_fn, known_ids, known_canvases))
      passes.append((result.params, result.table, result.eval_fn, new_ids, new_canvases))
  else:
    # Puzzles the run never saw: the blank embedding, and an identifier of their own for the evaluator.
    ids, canvases = [], []
    for puzzle in puzzles:
      puzzle_versions = versions.get(puzzle.id)
      if not puzzle_versions:
        eval_identifiers.append(puzzle.id)
        puzzle_versions = [(len(eval_identifiers) - 1, 0, None)]
      more_ids, more = _rows([puzzle], {puzzle.id: puzzle_versions})
      ids += more_ids
      canvases += more
    passes.append((params, table, eval_fn, ids, canvases))
    if unknown:
      print(f"warning: {len(unknown)} of {len(puzzles)} puzzle(s) are not in {run.data_path}'s identifiers.json: "
            "predicted once, untransformed, with the blank puzzle embedding (config.ttt.steps=0)", file=sys.stderr)

  meta_dir = pathlib.Path(tempfile.mkdtemp(prefix="trm-predict-"))
  try:
    dataset_format.write_json(meta_dir / dataset_format.IDENTIFIERS_FILE, eval_identifiers)
    dataset_format.write_json(meta_dir / dataset_format.TEST_PUZZLES_FILE, {p.id: p.raw for p in puzzles})
    voting = arc_settings(run.config)
    evaluator = arc_eval.ARCEvaluator(meta_dir, pass_ks=tuple(voting["pass_ks"]),
                                      submission_k=voting["submission_k"], blank_identifier_id=0)
    num_predictions = 0
    for pass_params, pass_table, pass_eval_fn, ids, canvases in passes:
      if not canvases:
        continue
      inputs = np.stack(canvases).astype(np.int32)
      ids = np.asarray(ids, np.int32)
      # Without TTT, a puzzle the run never saw is fed the blank row 0; the evaluator knows it by its own id.
      model_ids = np.where(ids < len(identifiers), ids, 0).astype(np.int32) if ttt_report is None else ids
      num_predictions += inputs.shape[0]

      def update(rows, _, host, inputs=inputs, ids=ids):
        evaluator.update(ids[rows], inputs[rows], host["preds"], host["q_halt_logits"])

      ttt.eval_rows(run, pass_eval_fn, pass_params, pass_table, inputs, np.full_like(inputs, -100), model_ids,
                    on_batch=update)
    metrics = evaluator.result(meta_dir / "out")
    if jax.process_index() == 0:
      output_path.parent.mkdir(parents=True, exist_ok=True)
      tmp = output_path.with_name(f".{output_path.name}.tmp-{os.getpid()}")
      shutil.copyfile(meta_dir / "out" / "submission.json", tmp)
      os.replace(tmp, output_path)
  finally:
    shutil.rmtree(meta_dir, ignore_errors=True)
  summary = {"submission": str(output_path), "checkpoint_step": step, "puzzles": len(puzzles),
             "unknown_puzzles": len(unknown), "predictions": num_predictions, **metrics}
  if ttt_report is not None:
    summary["ttt"] = ttt_report
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)
  return summary
