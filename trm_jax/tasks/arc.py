"""The ARC-AGI task: 30x30 canvases of colours, augmented puzzle versions, drawing, prediction.

Everything of ARC that more than one side needs lives here: the token layout
of a canvas (SPEC §7), reading and validating challenges/solutions files, the
names of augmented versions (``<id>|||t<k>|||<colour map>``) and their
inverses. ``data_prep.arc`` builds datasets with it; ``trm_jax.tasks.arc_eval``
(the ``arc`` evaluator: crop, undo the augmentation, vote),
``trm_jax.predict`` (``--mode=predict``) and ``trm_jax.ttt`` use it at run
time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from trm_jax import dataset_format
from trm_jax import errors
from trm_jax.tasks import base
from trm_jax.tasks import dihedral

GRID_SIZE = 30
SEQ_LEN = GRID_SIZE * GRID_SIZE
PAD_ID = 0
EOS_ID = 1
COLOUR_OFFSET = 2  # colour c -> token c + 2
NUM_COLOURS = 10
VOCAB_SIZE = NUM_COLOURS + COLOUR_OFFSET
PUZZLE_ID_SEPARATOR = "|||"
# A solutions file that is absent for a subset that is not the test set is
# filled with this output, as the original does.
DUMMY_OUTPUT = [[0]]
# The subset name of a dataset built from one challenges file (``--challenges-file``).
PREDICT_SUBSET_NAME = "challenges"


class ArcDataError(errors.UserError, ValueError):
  """The ARC input files (or a builder's flags) are not what ARC needs."""


@dataclasses.dataclass(frozen=True)
class SubsetFiles:
  """One subset's files; ``solutions_path`` may be None (no solutions)."""
  name: str
  challenges_path: pathlib.Path
  solutions_path: pathlib.Path | None

  @classmethod
  def from_prefix(cls, prefix: str, name: str) -> "SubsetFiles":
    return cls(name, pathlib.Path(f"{prefix}_{name}_challenges.json"),
               pathlib.Path(f"{prefix}_{name}_solutions.json"))


@dataclasses.dataclass
class Puzzle:
  """One original puzzle, its pairs in file order and where each goes."""
  id: str
  subset: str
  # (input, output) grids, uint8, in the order of the JSON file's keys.
  pairs: list[tuple[np.ndarray, np.ndarray]]
  # For each pair: True if it goes to the test split.
  to_test: list[bool]
  # The challenge with its solutions (test-set puzzles only), for test_puzzles.json.
  raw: dict[str, Any] | None = None

  def split_pairs(self, test: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    return [p for p, t in zip(self.pairs, self.to_test) if t == test]


class WarningCounter:
  """Prints warnings (up to a limit per kind) and counts them for a summary."""

  def __init__(self, max_printed: int = 20):
    self.counts: dict[str, int] = {}
    self.max_printed = max_printed

  def __call__(self, kind: str, msg: str) -> None:
    n = self.counts.get(kind, 0)
    self.counts[kind] = n + 1
    if n < self.max_printed:
      dataset_format.warn(msg)
    elif n == self.max_printed:
      dataset_format.warn(f"further '{kind}' warnings are counted, not printed")

  def summary(self) -> str:
    return ", ".join(f"{n} x {k}" for k, n in self.counts.items()) or "none"


# ---------------------------------------------------------------------------
# Reading and validating the JSON files.


def _load_json(path: pathlib.Path, what: str) -> Any:
  try:
    with dataset_format.open_input(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise ArcDataError(f"{path}: {what} file not found") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArcDataError(f"{path}: invalid JSON ({e})") from None


def grid_to_np(grid: Any, where: str) -> np.ndarray:
  """Validates one ARC grid (list of rows of ints 0..9, at most 30x30) -> uint8 [r, c]."""
  if not isinstance(grid, list) or not grid:
    raise ArcDataError(f"{where}: expected a grid (a non-empty list of rows), got {_short(grid)}")
  lengths = set()
  for row in grid:
    if not isinstance(row, list) or not row:
      raise ArcDataError(f"{where}: every row must be a non-empty list, got {_short(row)}")
    lengths.add(len(row))
  if len(lengths) != 1:
    raise ArcDataError(f"{where}: grid is not rectangular (row lengths {sorted(lengths)})")
  try:
    arr = np.array(grid)
  except (ValueError, TypeError):
    raise ArcDataError(f"{where}: grid cells must be integers 0..9") from None
  if arr.ndim != 2 or arr.dtype.kind not in "iu":
    raise ArcDataError(f"{where}: grid cells must be integers 0..9 (got {arr.dtype} values)")
  if arr.shape[0] > GRID_SIZE or arr.shape[1] > GRID_SIZE:
    raise ArcDataError(f"{where}: grid is {arr.shape[0]}x{arr.shape[1]}, larger than {GRID_SIZE}x{GRID_SIZE}")
  if arr.min() < 0 or arr.max() >= NUM_COLOURS:
    bad = arr[(arr < 0) | (arr >= NUM_COLOURS)][0]
    raise ArcDataError(f"{where}: colour {bad} outside 0..9")
  return arr.astype(np.uint8)


def _short(x: Any) -> str:
  s = json.dumps(x) if not isinstance(x, np.ndarray) else repr(x)
  return s if len(s) <= 40 else s[:37] + "..."


def load_subset(files: SubsetFiles, *, is_test_set: bool, allow_missing_test_solutions: bool,
                limit_puzzles: int | None, warnings: WarningCounter) -> list[Puzzle]:
  """Reads and validates one subset; puzzles come back in file order."""
  challenges = _load_json(files.challenges_path, f"challenges (subset {files.name!r})")
  cpath = files.challenges_path
  if not isinstance(challenges, dict) or not challenges:
    raise ArcDataError(f"{cpath}: expected a non-empty JSON object puzzle id -> puzzle")
  puzzle_ids = list(challenges)
  if limit_puzzles is not None:
    puzzle_ids = puzzle_ids[:limit_puzzles]

  solutions = None
  spath = files.solutions_path
  if spath is not None and dataset_format.input_exists(spath):
    solutions = _load_json(spath, "solutions")
    if not isinstance(solutions, dict):
      raise ArcDataError(f"{spath}: expected a JSON object puzzle id -> list of output grids")
    extra = set(solutions) - set(challenges)
    if extra:
      warnings("solutions without a challenge", f"{spath}: {len(extra)} puzzle id(s) have no challenge in "
               f"{cpath} and are ignored (e.g. {sorted(extra)[0]})")
  elif is_test_set and not allow_missing_test_solutions:
    raise ArcDataError(
        f"{spath}: solutions file of the test set {files.name!r} not found (the test split needs its "
        "outputs; pass --allow-missing-test-solutions to build one for prediction only)")
  else:
    what = f"{spath}: not found" if spath is not None else f"subset {files.name!r}: no solutions file"
    warnings("missing solutions file", f"{what}; its test inputs get the dummy output {DUMMY_OUTPUT} (as the "
             "original builder does)" + ("; test_puzzles.json gets no outputs" if is_test_set else ""))

  puzzles = []
  for pid in puzzle_ids:
    puzzle = challenges[pid]
    where = f"{cpath}: puzzle {pid}"
    if not isinstance(puzzle, dict):
      raise ArcDataError(f"{where}: expected an object with 'train' and 'test' lists")
    unknown = [k for k in puzzle if k not in ("train", "test")]
    if unknown or "train" not in puzzle or "test" not in puzzle:
      raise ArcDataError(f"{where}: expected exactly the keys 'train' and 'test', got {list(puzzle)}")
    for kind in ("train", "test"):
      if not isinstance(puzzle[kind], list) or not puzzle[kind]:
        raise ArcDataError(f"{where}: '{kind}' must be a non-empty list of examples")
      for i, ex in enumerate(puzzle[kind]):
        if not isinstance(ex, dict) or "input" not in ex:
          raise ArcDataError(f"{where}: {kind}[{i}] must be an object with an 'input' grid")
        if kind == "train" and "output" not in ex:
          raise ArcDataError(f"{where}: train[{i}] has no 'output' grid")

    test_outputs: list[Any] | None
    if solutions is not None:
      if pid not in solutions:
        raise ArcDataError(f"{spath}: puzzle {pid}: no solutions (the challenges file {cpath} has it)")
      test_outputs = solutions[pid]
      if not isinstance(test_outputs, list) or len(test_outputs) != len(puzzle["test"]):
        got = len(test_outputs) if isinstance(test_outputs, list) else _short(test_outputs)
        raise ArcDataError(f"{spath}: puzzle {pid}: expected {len(puzzle['test'])} output grid(s), one per "
                           f"test input, got {got}")
    else:
      test_outputs = None

    pairs, to_test = [], []
    for kind in puzzle:  # the file's key order decides the example order, as in the original
      for i, ex in enumerate(puzzle[kind]):
        inp = grid_to_np(ex["input"], f"{where}: {kind}[{i}].input")
        if kind == "train":
          out = grid_to_np(ex["output"], f"{where}: train[{i}].output")
        elif test_outputs is not None:
          out = grid_to_np(test_outputs[i], f"{spath}: puzzle {pid}: solution {i}")
        else:
          out = np.asarray(DUMMY_OUTPUT, np.uint8)
        pairs.append((inp, out))
        to_test.append(is_test_set and kind == "test")

    raw = None
    if is_test_set:
      raw = {kind: [dict(ex) for ex in puzzle[kind]] for kind in puzzle}
      for i, ex in enumerate(raw["test"]):
        if test_outputs is not None:
          ex["output"] = test_outputs[i]
        else:
          ex.pop("output", None)  # no solutions: the evaluator must not score against anything
    puzzles.append(Puzzle(pid, files.name, pairs, to_test, raw))
  return puzzles


# ---------------------------------------------------------------------------
# Augmented versions' names, and the canvas.


def aug_name(puzzle_id: str, tid: int, mapping: np.ndarray) -> str:
  return f"{puzzle_id}{PUZZLE_ID_SEPARATOR}t{tid}{PUZZLE_ID_SEPARATOR}{''.join(map(str, mapping.tolist()))}"


def parse_aug_name(name: str) -> tuple[str, int, np.ndarray | None]:
  """``name -> (original id, dihedral id, colour map [10] uint8 or None if not augmented)``."""
  if PUZZLE_ID_SEPARATOR not in name:
    return name, 0, None
  parts = name.split(PUZZLE_ID_SEPARATOR)
  if len(parts) < 3 or not parts[-2].startswith("t") or not parts[-2][1:].isdigit():
    raise ValueError(f"puzzle name {name!r} is not '<id>|||t<k>|||<10 digits>'")
  tid = int(parts[-2][1:])
  digits = parts[-1]
  if len(digits) != NUM_COLOURS or not digits.isdigit() or sorted(digits) != list("0123456789"):
    raise ValueError(f"puzzle name {name!r}: colour map {digits!r} is not a permutation of 0..9")
  if not 0 <= tid < dihedral.NUM_DIHEDRAL:
    raise ValueError(f"puzzle name {name!r}: dihedral id {tid} outside 0..7")
  return PUZZLE_ID_SEPARATOR.join(parts[:-2]), tid, np.frombuffer(digits.encode(), np.uint8) - ord("0")


def grid_canvas(grid: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
  """One grid as the 30x30 token canvas at ``offset`` (SPEC §7), uint8."""
  r, c = grid.shape
  pr, pc = offset
  canvas = np.zeros((GRID_SIZE, GRID_SIZE), np.uint8)
  canvas[pr:pr + r, pc:pc + c] = grid + COLOUR_OFFSET
  if pr + r < GRID_SIZE:
    canvas[pr + r, pc:pc + c] = EOS_ID
  if pc + c < GRID_SIZE:
    canvas[pr:pr + r, pc + c] = EOS_ID
  return canvas


# ---------------------------------------------------------------------------
# Drawing.


# The ARC palette (colours 0..9), as the ARC web viewer draws them.
COLOURS = np.array([
    [0, 0, 0], [0, 116, 217], [255, 65, 54], [46, 204, 64], [255, 220, 0],
    [170, 170, 170], [240, 18, 190], [255, 133, 27], [127, 219, 255], [135, 12, 37]], np.uint8)
PAD_COLOUR = np.array([40, 40, 40], np.uint8)
EOS_COLOUR = np.array([255, 255, 255], np.uint8)


def draw(tokens: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  """A canvas as an RGB image: colours as ARC draws them, the end-of-grid marks white, padding dark."""
  grid = base.square(tokens)
  rgb = np.where((grid >= COLOUR_OFFSET)[..., None], COLOURS[np.clip(grid - COLOUR_OFFSET, 0, NUM_COLOURS - 1)],
                 np.where((grid == EOS_ID)[..., None], EOS_COLOUR, PAD_COLOUR))
  return base.mark_wrong(base.cells_to_image(rgb.astype(np.uint8), 6), grid, reference)


TASK = base.Task(name="arc", draw=draw, predictor="trm_jax.predict")
