"""ARC prediction: a challenges JSON in, ``submission.json`` out (SPEC §9).

TRM learns one puzzle embedding per puzzle version (the original and its
dihedral x colour augmentations), so a puzzle can be predicted well only if
its versions were in the training data, as the evaluation puzzles are in the
paper's runs (their demonstration pairs are trained on). For every puzzle of
the challenges file, each version of it in the run's ``identifiers.json``
gets its test inputs transformed the same way and placed on the canvas; the
predictions are then cropped, un-augmented and voted on exactly as in
evaluation. A puzzle the run never saw is still predicted, once, untransformed
and with the blank embedding, and counted in a warning.

If a solutions file sits beside the challenges (``..._solutions.json``),
pass@K is reported too.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from data_prep import arc as arc_data
from data_prep import augment
from data_prep import common as data_common
from trm_jax import arc_eval
from trm_jax import sharding


def _solutions_beside(challenges: pathlib.Path) -> pathlib.Path | None:
  """``<x>_solutions.json`` beside ``<x>_challenges.json`` (either may be ``.xz``-compressed)."""
  name = challenges.name.removesuffix(".xz")
  if name.endswith("_challenges.json"):
    sibling = challenges.with_name(name[:-len("_challenges.json")] + "_solutions.json")
    if data_common.input_exists(sibling):
      return data_common.input_path(sibling)
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


def predict_arc(run: Any, eval_fn, params: Any, table: jax.Array, input_path: pathlib.Path,
                output_path: pathlib.Path, *, step: int) -> dict[str, Any]:
  """Runs the model on every version of every test input and writes the voted submission."""
  from trm_jax import train  # pylint: disable=g-import-not-at-top
  warnings = arc_data.WarningCounter()
  files = arc_data.SubsetFiles("challenges", input_path, _solutions_beside(input_path))
  try:
    puzzles = arc_data.load_subset(files, is_test_set=True, allow_missing_test_solutions=True,
                                   limit_puzzles=None, warnings=warnings)
  except arc_data.ArcDataError as e:
    raise train.UserError(str(e)) from None
  with open(run.data_path / data_common.IDENTIFIERS_FILE) as f:
    identifiers = json.load(f)
  versions = versions_by_puzzle(identifiers)

  # Rows: (model identifier, evaluator identifier, input canvas). Puzzles the
  # run never saw get the blank embedding and an identifier of their own for
  # the evaluator (appended to its copy of identifiers.json).
  eval_identifiers = list(identifiers)
  model_ids, eval_ids, canvases = [], [], []
  unknown = 0
  for puzzle in puzzles:
    test_inputs = [inp for (inp, _), to_test in zip(puzzle.pairs, puzzle.to_test) if to_test]
    puzzle_versions = versions.get(puzzle.id)
    if not puzzle_versions:
      unknown += 1
      eval_identifiers.append(puzzle.id)
      puzzle_versions = [(None, 0, None)]
    for identifier, tid, mapping in puzzle_versions:
      eval_id = identifier if identifier is not None else len(eval_identifiers) - 1
      for grid in test_inputs:
        mapped = grid if mapping is None else mapping[grid]
        canvases.append(arc_data.grid_canvas(augment.dihedral_transform(mapped, tid)).reshape(-1))
        model_ids.append(identifier or 0)
        eval_ids.append(eval_id)
  if unknown:
    print(f"warning: {unknown} of {len(puzzles)} puzzle(s) are not in {run.data_path}'s identifiers.json: "
          "predicted once, untransformed, with the blank puzzle embedding", file=sys.stderr)

  meta_dir = pathlib.Path(tempfile.mkdtemp(prefix="trm-predict-"))
  try:
    data_common.write_json(meta_dir / data_common.IDENTIFIERS_FILE, eval_identifiers)
    data_common.write_json(meta_dir / data_common.TEST_PUZZLES_FILE, {p.id: p.raw for p in puzzles})
    evaluator = arc_eval.ARCEvaluator(meta_dir, pass_ks=tuple(run.config.arc_pass_ks),
                                      submission_k=run.config.arc_submission_k, blank_identifier_id=0)
    inputs = np.stack(canvases).astype(np.int32)
    model_ids = np.asarray(model_ids, np.int32)
    eval_ids = np.asarray(eval_ids, np.int32)
    bs = run.eval_batch_size
    local = bs // jax.process_count()
    lo = jax.process_index() * local
    for start in range(0, inputs.shape[0], bs):
      end = min(start + bs, inputs.shape[0])
      pad = bs - (end - start)
      batch_inputs = np.pad(inputs[start:end], ((0, pad), (0, 0)))
      batch = {"inputs": batch_inputs, "labels": np.full_like(batch_inputs, -100),
               "puzzle_identifiers": np.pad(model_ids[start:end], (0, pad))}
      batch = sharding.global_batch({k: v[lo:lo + local] for k, v in batch.items()}, run.mesh, bs)
      _, outputs = eval_fn(params, table, batch)
      preds = train._to_host(outputs["preds"])[:end - start]  # pylint: disable=protected-access
      q = train._to_host(outputs["q_halt_logits"])[:end - start]  # pylint: disable=protected-access
      evaluator.update(eval_ids[start:end], inputs[start:end], preds, q)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    write_dir = meta_dir / "out"
    metrics = evaluator.result(write_dir)
    if jax.process_index() == 0:
      shutil.move(str(write_dir / "submission.json"), str(output_path))
  finally:
    shutil.rmtree(meta_dir, ignore_errors=True)
  summary = {"submission": str(output_path), "checkpoint_step": step, "puzzles": len(puzzles),
             "unknown_puzzles": unknown, "predictions": int(inputs.shape[0]), **metrics}
  if jax.process_index() == 0:
    print(json.dumps(summary), flush=True)
  return summary
