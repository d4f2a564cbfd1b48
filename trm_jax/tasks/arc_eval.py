"""The ``arc`` evaluator (SPEC §9): crop, undo augmentations, vote, pass@K, submission.json.

numpy only (no jax), so it runs on any host. Usage::

  ev = ARCEvaluator(dataset_dir)
  for batch, preds, q_halt in ...:     # the test split, rows in any order
    ev.update(batch["puzzle_identifiers"], batch["inputs"], preds, q_halt)
  # Several processes: every process calls ev.state(), the states travel
  # (they are JSON-serialisable), process 0 calls ev.merge(other_states).
  metrics = ev.result(output_dir)       # {"ARC/pass@1": ..., ...}, writes submission.json

Matches the original ``evaluators/arc.py`` except where noted:
- exact ties in (vote count, mean q) are broken by the predicted grid's hash
  (the original keeps arrival order, so its ranking of tied grids depends on how
  many processes gathered them); the mean q is summed with ``math.fsum`` for
  the same reason. With both, the result does not depend on how predictions
  were split over processes or in which order they arrived;
- a test input without any prediction gets ``[[0]]`` attempts in
  ``submission.json`` (the original leaves it out, which the ARC Prize format
  does not allow) and scores 0, as in the original; so does an attempt whose
  crop is empty (the original writes ``[]``, no ARC grid either);
- test puzzles without solutions (``test_puzzles.json`` built with
  ``--allow-missing-test-solutions``) are left out of pass@K; their
  submission is still written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from trm_jax.tasks import arc
from trm_jax.tasks import base
from trm_jax.tasks import dihedral

GRID_SIZE = arc.GRID_SIZE
_FIRST_COLOUR = arc.COLOUR_OFFSET
_LAST_COLOUR = arc.COLOUR_OFFSET + arc.NUM_COLOURS - 1
# The keys of an ``arc`` entry of ``config.evaluators`` and their defaults (the original's).
DEFAULTS = {"pass_ks": (1, 2, 5, 10, 100, 1000), "submission_k": 2, "aggregated_voting": True}


def crop_sizes(canvases_BxS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Rows and columns of the largest top-left all-colour rectangle of each canvas.

  Grows the rectangle row by row; the column count shrinks to the first
  non-colour token of each new row; the largest area wins (the first of equal
  areas). A canvas whose first token is not a colour gives 0 x 0.
  """
  grids = np.asarray(canvases_BxS).reshape(-1, GRID_SIZE, GRID_SIZE)
  is_colour = (grids >= _FIRST_COLOUR) & (grids <= _LAST_COLOUR)
  # Columns of colour at the start of each row.
  run = np.where(is_colour.all(axis=2), GRID_SIZE, np.argmin(is_colour, axis=2))
  cols_by_rows = np.minimum.accumulate(run, axis=1)
  area = cols_by_rows * np.arange(1, GRID_SIZE + 1)
  best = np.argmax(area, axis=1)
  rows = np.where(area[np.arange(grids.shape[0]), best] > 0, best + 1, 0)
  cols = np.where(rows > 0, cols_by_rows[np.arange(grids.shape[0]), best], 0)
  return rows, cols


def crop(canvas: np.ndarray) -> np.ndarray:
  """A 900-token (or 30x30) canvas -> its grid of colours 0..9, uint8 ``[r, c]``."""
  rows, cols = crop_sizes(canvas)
  grid = np.asarray(canvas).reshape(GRID_SIZE, GRID_SIZE)
  return (grid[:rows[0], :cols[0]] - _FIRST_COLOUR).astype(np.uint8)


def inverse_aug(name: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """``name -> (original puzzle id, function undoing the version's augmentation on a grid)``.

  The inverse applies the inverse dihedral transform, then the inverse colour map.
  """
  orig, tid, mapping = arc.parse_aug_name(name)
  if mapping is None:
    return orig, lambda grid: grid
  inverse_colours = np.argsort(mapping).astype(np.uint8)

  def undo(grid: np.ndarray) -> np.ndarray:
    return inverse_colours[dihedral.inverse_dihedral_transform(grid, tid)]

  return orig, undo


def grid_hash(grid: np.ndarray) -> str:
  """SHA-256 over the shape bytes and the uint8 cells (the original's grid hash)."""
  grid = np.ascontiguousarray(grid, np.uint8)
  if grid.ndim != 2 or max(grid.shape, default=0) > 255:
    raise ValueError(f"grid_hash needs a 2-D grid of at most 255x255, got shape {grid.shape}")
  return hashlib.sha256(bytes(grid.shape) + grid.tobytes()).hexdigest()


def sigmoid64(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class ARCEvaluator:
  """Pools the predictions of every augmented version per original test input."""

  def __init__(self, dataset_dir: str | os.PathLike, pass_ks: Sequence[int] = (1, 2, 5, 10, 100, 1000),
               submission_k: int = 2, blank_identifier_id: int | None = None, aggregated_voting: bool = True):
    """Reads ``identifiers.json`` and ``test_puzzles.json`` of ``dataset_dir``.

    ``blank_identifier_id``: the padding rows' identifier; by default the test
    split's ``dataset.json`` value (0 when there is none).
    ``aggregated_voting`` (the original's default, True): ``begin_eval`` keeps
    the predictions of earlier evaluations, so votes pool across evaluations
    of the same evaluator; False starts each evaluation afresh.
    """
    dataset_dir = pathlib.Path(dataset_dir)
    self.pass_ks = tuple(int(k) for k in pass_ks)
    self.submission_k = int(submission_k)
    if self.submission_k < 1:
      raise ValueError(f"submission_k must be >= 1, got {submission_k}")
    if blank_identifier_id is None:
      meta_path = dataset_dir / "test" / "dataset.json"
      blank_identifier_id = _read_json(meta_path, dict).get("blank_identifier_id", 0) if meta_path.is_file() else 0
    self.blank_identifier_id = int(blank_identifier_id)
    self.aggregated_voting = aggregated_voting
    self.identifiers = _read_json(dataset_dir / "identifiers.json", list)
    self.test_puzzles = _read_json(dataset_dir / "test_puzzles.json", dict)
    self._inverse_cache: dict[int, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}
    self.reset()

  def reset(self) -> None:
    # pred hash -> grid; and per original puzzle, per input hash, the (pred hash, q) list.
    self._grids: dict[str, np.ndarray] = {}
    self._preds: dict[str, dict[str, list[tuple[str, float]]]] = {}

  def begin_eval(self) -> None:
    if not self.aggregated_voting:
      self.reset()

  def _inverse(self, identifier: int) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    if identifier not in self._inverse_cache:
      if not 0 <= identifier < len(self.identifiers):
        raise ValueError(f"puzzle identifier {identifier} outside identifiers.json "
                         f"(0..{len(self.identifiers) - 1})")
      self._inverse_cache[identifier] = inverse_aug(self.identifiers[identifier])
    return self._inverse_cache[identifier]

  def update(self, puzzle_identifiers_B: np.ndarray, inputs_BxS: np.ndarray, preds_BxS: np.ndarray,
             q_halt_logits_B: np.ndarray) -> None:
    """Adds one batch; rows with the blank identifier (padding) are skipped."""
    ids = np.asarray(puzzle_identifiers_B).reshape(-1)
    keep = ids != self.blank_identifier_id
    ids = ids[keep]
    inputs = np.asarray(inputs_BxS).reshape(keep.shape[0], -1)[keep]
    preds = np.asarray(preds_BxS).reshape(keep.shape[0], -1)[keep]
    qs = sigmoid64(np.asarray(q_halt_logits_B).reshape(-1)[keep])
    in_rows, in_cols = crop_sizes(inputs)
    pr_rows, pr_cols = crop_sizes(preds)
    inputs = inputs.reshape(-1, GRID_SIZE, GRID_SIZE)
    preds = preds.reshape(-1, GRID_SIZE, GRID_SIZE)
    for b, identifier in enumerate(ids.tolist()):
      orig, undo = self._inverse(identifier)
      inp = undo((inputs[b, :in_rows[b], :in_cols[b]] - _FIRST_COLOUR).astype(np.uint8))
      pred = undo((preds[b, :pr_rows[b], :pr_cols[b]] - _FIRST_COLOUR).astype(np.uint8))
      h = grid_hash(pred)
      self._grids.setdefault(h, np.ascontiguousarray(pred))
      self._preds.setdefault(orig, {}).setdefault(grid_hash(inp), []).append((h, float(qs[b])))

  @property
  def num_predictions(self) -> int:
    return sum(len(v) for per_input in self._preds.values() for v in per_input.values())

  def state(self) -> dict[str, Any]:
    """This process's predictions as a JSON-serialisable dict (for ``merge`` elsewhere)."""
    return {
        "grids": {h: g.tolist() for h, g in self._grids.items()},
        "preds": [[orig, ih, ph, q] for orig, per_input in self._preds.items()
                  for ih, lst in per_input.items() for ph, q in lst],
    }

  def merge(self, states: Iterable[Mapping[str, Any]]) -> None:
    """Adds the predictions of other processes' ``state()`` to this evaluator."""
    for st in states:
      for h, g in st["grids"].items():
        grid = np.asarray(g, np.uint8) if g else np.zeros((0, 0), np.uint8)
        self._grids.setdefault(h, grid.reshape(len(g), -1) if g else grid)
      for orig, ih, ph, q in st["preds"]:
        if ph not in self._grids:
          raise ValueError(f"merged state predicts grid {ph[:12]}... for puzzle {orig} but does not hold it")
        self._preds.setdefault(orig, {}).setdefault(ih, []).append((ph, float(q)))

  def ranked(self, puzzle_name: str, input_grid: np.ndarray) -> list[tuple[str, int, float]]:
    """The pooled predictions for one original test input: ``[(pred hash, votes, mean q)]`` best first."""
    stats: dict[str, list[float]] = {}
    for h, q in self._preds.get(puzzle_name, {}).get(grid_hash(input_grid), []):
      stats.setdefault(h, []).append(q)
    ranked = [(h, len(qs), math.fsum(qs) / len(qs)) for h, qs in stats.items()]
    ranked.sort(key=lambda t: (-t[1], -t[2], t[0]))
    return ranked

  def result(self, output_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """pass@K over the test puzzles with solutions; writes ``submission.json`` into ``output_dir``."""
    submission: dict[str, list[dict[str, Any]]] = {}
    correct = np.zeros(len(self.pass_ks), np.float64)
    scored = 0
    no_predictions = 0
    for name, puzzle in self.test_puzzles.items():
      submission[name] = []
      tests = puzzle["test"]
      has_solutions = all("output" in pair for pair in tests)
      hits = np.zeros(len(self.pass_ks), np.float64)
      for pair in tests:
        ranked = self.ranked(name, np.asarray(pair["input"], np.uint8))
        if not ranked:
          no_predictions += 1
          submission[name].append({f"attempt_{i + 1}": [[0]] for i in range(self.submission_k)})
          continue
        if has_solutions:
          label = grid_hash(np.asarray(pair["output"], np.uint8))
          for i, k in enumerate(self.pass_ks):
            hits[i] += any(h == label for h, _, _ in ranked[:k])
        # An empty crop (the canvas does not start with a colour) is no ARC grid: [[0]] stands in.
        grids = [self._grids[h] if self._grids[h].size else np.zeros((1, 1), np.uint8)
                 for h, _, _ in ranked[:self.submission_k]]
        grids += [grids[0]] * (self.submission_k - len(grids))
        submission[name].append({f"attempt_{i + 1}": g.tolist() for i, g in enumerate(grids)})
      if has_solutions:
        correct += hits / len(tests)
        scored += 1
    if no_predictions:
      print(f"warning: {no_predictions} test input(s) had no predictions", file=sys.stderr)
    if output_dir is not None:
      out = pathlib.Path(output_dir)
      out.mkdir(parents=True, exist_ok=True)
      tmp = out / "submission.json.tmp"
      with open(tmp, "w") as f:
        json.dump(submission, f)
      tmp.rename(out / "submission.json")
    if not scored:
      return {}
    return {f"ARC/pass@{k}": float(correct[i] / scored) for i, k in enumerate(self.pass_ks)}


def _read_json(path: pathlib.Path, kind: type) -> Any:
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: missing (the ARC evaluator needs a dataset built by data_prep.arc)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(obj, kind):
    raise ValueError(f"{path}: expected a JSON {'list' if kind is list else 'object'}")
  return obj


# ---------------------------------------------------------------------------
# The evaluator of a run (``config.evaluators.<name>.type = "arc"``).


class RunEvaluator:
  """``ARCEvaluator`` as a run's evaluator (``trm_jax.tasks.base.Evaluator``).

  With ``aggregated_voting`` (the original's default) the votes of every
  evaluation of the run are pooled: later evaluations also count the
  predictions of earlier ones. The pool is saved in checkpoints.
  """

  def __init__(self, data_path: pathlib.Path, pass_ks, submission_k: int, aggregated_voting: bool = True):
    self._ev = ARCEvaluator(data_path, pass_ks=tuple(pass_ks), submission_k=submission_k,
                            aggregated_voting=aggregated_voting)

  def begin_eval(self) -> None:
    self._ev.begin_eval()

  def update(self, set_name: str, batch: Mapping[str, np.ndarray]) -> None:
    del set_name
    self._ev.update(batch["puzzle_identifiers"], batch["inputs"], batch["preds"], batch["q_halt_logits"])

  def result(self, output_dir: pathlib.Path | None) -> dict[str, float]:
    import jax  # pylint: disable=g-import-not-at-top
    write = output_dir if jax.process_index() == 0 else None
    return dict(self._ev.result(write))

  def state(self) -> Any:
    return self._ev.state() if self._ev.aggregated_voting else None

  def load_state(self, state: Any) -> None:
    self._ev.reset()
    if state:
      self._ev.merge([state])


def make_evaluator(settings: Mapping[str, Any], data_path: pathlib.Path, test_info: Any) -> RunEvaluator:
  del test_info
  return RunEvaluator(data_path, settings["pass_ks"], settings["submission_k"], settings["aggregated_voting"])


EVALUATOR = base.EvaluatorType(name="arc", make=make_evaluator, defaults=DEFAULTS)

