"""Builds the ARC-AGI dataset (SPEC §7) in the trm-jax format of ``trm_jax.dataset_format``.

Usage (ARC-AGI-2, the paper's setting)::

  python -m data_prep.arc --subsets training2 evaluation2 concept \
      --test-set-name evaluation2 --output-dir data/arc2concept-aug-1000

Reads ``<prefix>_<subset>_challenges.json`` and ``<prefix>_<subset>_solutions.json``
for every subset (or their ``.xz``-compressed forms). ``--input-file-prefix``
defaults to the files shipped in ``data_prep/raw/arc`` (ARC-AGI-1, ARC-AGI-2
and ConceptARC), found from this file, not the working directory.

The output equals the original builder's (``dataset/build_arc_dataset.py`` of
TinyRecursiveModels) run with the same seed, example for example: the same
legacy ``numpy.random.RandomState`` draws in the same order (puzzle shuffle
and augmentation draws for all subsets first, then the translation draws of
the train split), the same names, identifiers, groups and canvases. Where the
original depends on Python's string-hash randomisation (the order of its two
splits when the test set is the first subset), the train split goes first.

Prediction on any challenges file (solutions optional): ``--challenges-file
X.json [--solutions-file Y.json]`` builds a dataset whose only subset is that
file and which is also the test set: its train pairs form the train split (to
fit the new puzzles' embeddings), its test inputs the test split (dummy labels
without solutions), and ``test_puzzles.json`` holds the challenges (with
outputs only when known) for ``trm_jax.tasks.arc_eval.ARCEvaluator``. The same from
Python: ``build_arc_dataset([SubsetFiles(name, challenges, solutions_or_None)],
name, out_dir, allow_missing_test_solutions=True)``. With the Kaggle naming,
``--subsets test --test-set-name test --allow-missing-test-solutions`` does the
same.

Memory: the original holds every augmented grid before writing; here a first
pass draws only the augmentation plans (a transform id and a colour map per
version, 11 bytes each, de-duplicated with a 16-byte digest per version) and a
second pass builds and streams one puzzle group at a time to both splits.
Identifiers are assigned in train-split write order (a name gets the next id
the first time it is written), which is the original's order: every name of
the test split also occurs in the train split, because a test-set puzzle's
train pairs and test pairs carry the same versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import pathlib
import sys
import time
from typing import Any, Sequence

import numba
import numpy as np

from data_prep import common
from trm_jax.tasks import dihedral
# The ARC task's canvas, names and file reading (``trm_jax.tasks.arc``), named here as before.
from trm_jax.tasks.arc import (  # pylint: disable=unused-import
    COLOUR_OFFSET, DUMMY_OUTPUT, EOS_ID, GRID_SIZE, NUM_COLOURS, PAD_ID, PREDICT_SUBSET_NAME, PUZZLE_ID_SEPARATOR,
    SEQ_LEN, VOCAB_SIZE, ArcDataError, Puzzle, SubsetFiles, WarningCounter, aug_name, grid_canvas, grid_to_np,
    load_subset, parse_aug_name)

AUGMENT_RETRIES_FACTOR = 5
BLANK_NAME = "<blank>"
SET_NAME = "all"


def default_input_prefix() -> str:
  """The ARC files shipped with the project (``data_prep/raw/arc``, xz-compressed)."""
  return str(common.RAW_DATA_DIR / "arc" / "arc-agi")


# ---------------------------------------------------------------------------
# Augmentation plans (pass 1).


@numba.njit(cache=True)
def _pair_less(mapped, a0, a1, b0, b1):
  """Orders two byte ranges of ``mapped``: shorter first, then lexicographically."""
  if a1 - a0 != b1 - b0:
    return a1 - a0 < b1 - b0
  for k in range(a1 - a0):
    if mapped[a0 + k] != mapped[b0 + k]:
      return mapped[a0 + k] < mapped[b0 + k]
  return False


@numba.njit(cache=True)
def _canonical_kernel(layouts, bounds, tids, mappings, out):
  """``out[t]``: the puzzle under (tids[t], mappings[t]) as bytes, its pairs in a canonical order.

  ``layouts[k]`` holds the pairs under dihedral k (colours 0..9, shapes as
  10 + n), ``bounds[k, p]`` the byte range of pair p.
  """
  num_pairs = bounds.shape[1]
  size = out.shape[1]
  lut = np.arange(256).astype(np.uint8)
  mapped = np.empty(size, np.uint8)
  order = np.empty(num_pairs, np.int64)
  for t in range(tids.shape[0]):
    tid = tids[t]
    for c in range(10):
      lut[c] = mappings[t, c]
    for k in range(size):
      mapped[k] = lut[layouts[tid, k]]
    for i in range(num_pairs):
      order[i] = i
    for i in range(1, num_pairs):  # insertion sort: a few pairs
      j = i
      while j > 0 and _pair_less(mapped, bounds[tid, order[j], 0], bounds[tid, order[j], 1],
                                 bounds[tid, order[j - 1], 0], bounds[tid, order[j - 1], 1]):
        order[j], order[j - 1] = order[j - 1], order[j]
        j -= 1
    pos = 0
    for i in range(num_pairs):
      a, b = bounds[tid, order[i], 0], bounds[tid, order[i], 1]
      out[t, pos:pos + b - a] = mapped[a:b]
      pos += b - a


class _ContentKeys:
  """Content keys of a puzzle's versions for de-duplication.

  Two versions are duplicates when their multisets of (input, output) pairs
  are equal, shapes included: the original compares a SHA-256 over the sorted
  per-pair grid hashes, which decides the same equality. Here a version's key
  is a 128-bit BLAKE2b digest of its pairs' bytes (shape header + cells) in a
  canonical pair order; the bytes come from a compiled kernel, a whole chunk
  of draws at a time.
  """

  def __init__(self, pairs: Sequence[tuple[np.ndarray, np.ndarray]]):
    layouts, bounds = [], []
    for tid in range(dihedral.NUM_DIHEDRAL):
      parts, pos, b = [], 0, []
      for inp, out in pairs:
        ti, to = dihedral.dihedral_transform(inp, tid), dihedral.dihedral_transform(out, tid)
        # Shapes as 10 + n: above the colours, so the colour lookup leaves them alone.
        header = np.array([10 + ti.shape[0], 10 + ti.shape[1], 10 + to.shape[0], 10 + to.shape[1]], np.uint8)
        parts += [header, ti.ravel(), to.ravel()]
        size = 4 + ti.size + to.size
        b.append((pos, pos + size))
        pos += size
      layouts.append(np.concatenate(parts))
      bounds.append(b)
    self._layouts = np.stack(layouts)
    self._bounds = np.asarray(bounds, np.int64)

  def canonical(self, tids: np.ndarray, mappings: np.ndarray) -> np.ndarray:
    out = np.empty((tids.shape[0], self._layouts.shape[1]), np.uint8)
    _canonical_kernel(self._layouts, self._bounds, np.asarray(tids, np.int64),
                      np.asarray(mappings, np.uint8).reshape(-1, NUM_COLOURS), out)
    return out

  @staticmethod
  def digest(canonical_row: np.ndarray) -> bytes:
    return hashlib.blake2b(canonical_row, digest_size=16).digest()


@dataclasses.dataclass
class AugmentPlan:
  """The versions of one puzzle after the original: dihedral ids and colour maps."""
  tids: np.ndarray  # [n] uint8
  mappings: np.ndarray  # [n, 10] uint8


IDENTITY_MAPPING = np.arange(NUM_COLOURS, dtype=np.uint8)


# ---------------------------------------------------------------------------
# The original's random draws, without a Python call per draw.
#
# Every draw the original makes (``randint(0, n)``, ``shuffle``,
# ``permutation``) is legacy RandomState's masked rejection sampling on the
# Mersenne Twister's 32-bit words: ``mask`` = the smallest 2^k - 1 >= range,
# take ``word & mask`` until it is <= range (a range of 0 takes no word).
# ``_RandomWords`` pulls the words in blocks from ``RandomState(seed)`` and the
# kernels below consume them as those calls would; the tests check the draws
# against RandomState itself.


@numba.njit(cache=True)
def _bounded(words, pos, rng):
  """A draw in 0..rng from ``words[pos:]`` -> (value, next pos), or (-1, -1) when the words run out."""
  if rng == 0:
    return 0, pos
  mask = rng
  mask |= mask >> 1
  mask |= mask >> 2
  mask |= mask >> 4
  mask |= mask >> 8
  mask |= mask >> 16
  while pos < words.shape[0]:
    value = np.int64(words[pos]) & mask
    pos += 1
    if value <= rng:
      return value, pos
  return -1, -1


@numba.njit(cache=True)
def _shuffle_kernel(words, pos, n):
  """The index order ``RandomState.shuffle`` gives a list of ``n`` -> (order, next pos or -1)."""
  order = np.arange(n)
  for i in range(n - 1, 0, -1):
    j, pos = _bounded(words, pos, i)
    if pos < 0:
      return order, -1
    order[i], order[j] = order[j], order[i]
  return order, pos


@numba.njit(cache=True)
def _trials_kernel(words, pos, tids, mappings, ends):
  """Augmentation draws (``randint(0, 8)``, then ``permutation`` of colours 1..9) for each row.

  Fills ``tids[t]``, ``mappings[t]`` and the word position after trial t; returns the number of
  trials completed before the words ran out.
  """
  for t in range(tids.shape[0]):
    tid, p = _bounded(words, pos, 7)
    if p < 0:
      return t
    for c in range(10):
      mappings[t, c] = c
    for i in range(8, 0, -1):
      j, p = _bounded(words, p, i)
      if p < 0:
        return t
      mappings[t, 1 + i], mappings[t, 1 + j] = mappings[t, 1 + j], mappings[t, 1 + i]
    tids[t] = tid
    ends[t] = p
    pos = p
  return tids.shape[0]


@numba.njit(cache=True)
def _tokens_kernel(words, pos, canvases, rows, cols, tids, luts, translate, out, start):
  """Token canvases of versions ``start..``: ``out[v, e, 0/1]`` = input/output of example e.

  ``canvases[t, e, 0/1]`` are the (0, 0) canvases under dihedral t in original
  colours, ``rows``/``cols[t, e]`` the larger grid extent of the pair. With
  ``translate``, the original's draws: the example kept at (0, 0), then a row
  and a column offset for every other one. Returns (versions done, next pos);
  fewer than all when the words ran out (the caller refills and resumes).
  """
  size = canvases.shape[3]
  n = canvases.shape[1]
  for v in range(start, tids.shape[0]):
    t = tids[v]
    p = pos
    keep = 0
    if translate:
      keep, p = _bounded(words, p, n - 1)
      if p < 0:
        return v, pos
    for e in range(n):
      pr = 0
      pc = 0
      if translate and e != keep:
        pr, p = _bounded(words, p, size - rows[t, e])
        if p < 0:
          return v, pos
        pc, p = _bounded(words, p, size - cols[t, e])
        if p < 0:
          return v, pos
      for s in range(2):
        for i in range(size):
          for j in range(size):
            if i < pr or j < pc:
              out[v, e, s, i, j] = 0
            else:
              out[v, e, s, i, j] = luts[v, canvases[t, e, s, i - pr, j - pc]]
    pos = p
  return tids.shape[0], pos


class _RandomWords:
  """The 32-bit word stream of ``numpy.random.RandomState(seed)``, read ahead in blocks."""

  BLOCK = 1 << 18

  def __init__(self, seed: int):
    self._state = np.random.RandomState(seed)
    self.words = np.empty(0, np.uint32)
    self.pos = 0

  def ensure(self, count: int) -> None:
    """Makes at least ``count`` unread words available at ``self.words[self.pos:]``."""
    unread = self.words.shape[0] - self.pos
    if unread < count:
      more = self._state.randint(0, 1 << 32, size=max(count - unread, self.BLOCK), dtype=np.uint32)
      self.words = np.concatenate([self.words[self.pos:], more])
      self.pos = 0

  def shuffle(self, items: list) -> list:
    """``RandomState.shuffle(items)``, returned as a new list."""
    self.ensure(64 * len(items) + 64)
    order, pos = _shuffle_kernel(self.words, self.pos, len(items))
    while pos < 0:  # practically never: more than 64 words per draw
      self.ensure(2 * (self.words.shape[0] - self.pos))
      order, pos = _shuffle_kernel(self.words, self.pos, len(items))
    self.pos = pos
    return [items[i] for i in order]


def plan_augmentations(puzzle: Puzzle, num_aug: int, words: _RandomWords,
                       warnings: WarningCounter) -> AugmentPlan:
  """Draws up to ``num_aug`` distinct versions, with the original's draws and retry budget.

  A version is the same puzzle as an earlier one when its content key is; two
  draws with the same dihedral id and the same colour map on the colours the
  puzzle uses are the same puzzle, so their key is computed once.
  """
  accepted_tids, accepted_maps = [], []
  if num_aug > 0:
    keys = _ContentKeys(puzzle.pairs)
    used = np.unique(np.concatenate([g.ravel() for pair in puzzle.pairs for g in pair]))
    seen = {keys.digest(keys.canonical(np.zeros(1, np.int64), IDENTITY_MAPPING)[0])}
    key_by_draw: dict[tuple[int, bytes], bytes] = {}
    tries_left = AUGMENT_RETRIES_FACTOR * num_aug
    while tries_left > 0 and len(accepted_tids) < num_aug:
      chunk = min(tries_left, max(64, 2 * (num_aug - len(accepted_tids))))
      words.ensure(40 * chunk)
      tids = np.empty(chunk, np.int64)
      maps = np.empty((chunk, NUM_COLOURS), np.uint8)
      ends = np.empty(chunk, np.int64)
      done = _trials_kernel(words.words, words.pos, tids, maps, ends)
      if done == 0:
        words.ensure(2 * (words.words.shape[0] - words.pos))
        continue
      canonical = keys.canonical(tids[:done], maps[:done])
      end = ends[done - 1]
      for t in range(done):
        tries_left -= 1
        # The same dihedral id and colour map on the used colours: the same puzzle.
        draw = (int(tids[t]), maps[t, used].tobytes())
        key = key_by_draw.get(draw)
        if key is None:
          key = key_by_draw[draw] = keys.digest(canonical[t])
        if key not in seen:
          seen.add(key)
          accepted_tids.append(draw[0])
          accepted_maps.append(maps[t])
          if len(accepted_tids) >= num_aug:
            end = ends[t]
            break
      words.pos = int(end)
    if len(accepted_tids) < num_aug:
      warnings("augmentation not full",
               f"puzzle {puzzle.id} (subset {puzzle.subset!r}): only {len(accepted_tids)} distinct augmentations "
               f"of {num_aug} after {AUGMENT_RETRIES_FACTOR * num_aug} tries")
  return AugmentPlan(np.asarray(accepted_tids, np.uint8).reshape(-1),
                     np.asarray(accepted_maps, np.uint8).reshape(-1, NUM_COLOURS))


# ---------------------------------------------------------------------------
# Canvases (pass 2).


def pair_canvases(pairs: Sequence[tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(0, 0) canvases of the pairs under every dihedral transform, in original colours.

  -> canvases [8, n, 2, 30, 30] uint8, and the larger row and column count of
  each transformed pair, [8, n] each.
  """
  n = len(pairs)
  canv = np.empty((dihedral.NUM_DIHEDRAL, n, 2, GRID_SIZE, GRID_SIZE), np.uint8)
  rows = np.empty((dihedral.NUM_DIHEDRAL, n), np.int64)
  cols = np.empty((dihedral.NUM_DIHEDRAL, n), np.int64)
  for t in range(dihedral.NUM_DIHEDRAL):
    for e, (inp, out) in enumerate(pairs):
      ti, to = dihedral.dihedral_transform(inp, t), dihedral.dihedral_transform(out, t)
      canv[t, e, 0] = grid_canvas(ti)
      canv[t, e, 1] = grid_canvas(to)
      rows[t, e] = max(ti.shape[0], to.shape[0])
      cols[t, e] = max(ti.shape[1], to.shape[1])
  return canv, rows, cols


def token_luts(mappings: np.ndarray) -> np.ndarray:
  """Colour maps [V, 10] -> token lookup tables [V, 12] (PAD and EOS stay)."""
  mappings = np.asarray(mappings, np.uint8).reshape(-1, NUM_COLOURS)
  luts = np.empty((mappings.shape[0], VOCAB_SIZE), np.uint8)
  luts[:, PAD_ID] = PAD_ID
  luts[:, EOS_ID] = EOS_ID
  luts[:, COLOUR_OFFSET:] = mappings + COLOUR_OFFSET
  return luts


def group_tokens(pairs: Sequence[tuple[np.ndarray, np.ndarray]], tids: np.ndarray, mappings: np.ndarray,
                 words: _RandomWords | None) -> np.ndarray:
  """Token canvases [V, n, 2, 900] of every version of one puzzle; translated when ``words`` is given."""
  canv, rows, cols = pair_canvases(pairs)
  tids = np.asarray(tids, np.int64)
  luts = token_luts(mappings)
  out = np.empty((tids.shape[0], len(pairs), 2, GRID_SIZE, GRID_SIZE), np.uint8)
  dummy = np.empty(0, np.uint32)
  done = 0
  while done < tids.shape[0]:
    if words is None:
      done, _ = _tokens_kernel(dummy, 0, canv, rows, cols, tids, luts, False, out, done)
    else:
      words.ensure(8 * len(pairs) * (tids.shape[0] - done) + 64)
      done, words.pos = _tokens_kernel(words.words, words.pos, canv, rows, cols, tids, luts, True, out, done)
  return out.reshape(tids.shape[0], len(pairs), 2, SEQ_LEN)


# ---------------------------------------------------------------------------
# The build.


@dataclasses.dataclass
class BuildStats:
  total_puzzles: int
  num_identifiers: int
  examples: dict[str, int]
  seconds: float
  warnings: str


def build_arc_dataset(subsets: Sequence[SubsetFiles], test_set_name: str, output_dir: str | os.PathLike,
                      *, num_aug: int = 1000, seed: int = 42, overwrite: bool = False,
                      limit_puzzles: int | None = None, allow_missing_test_solutions: bool = False,
                      examples_per_shard: int = common.DEFAULT_EXAMPLES_PER_SHARD,
                      verbose: bool = True) -> BuildStats:
  """Builds the dataset; raises ArcDataError on bad input (nothing is left on disk then)."""
  t0 = time.time()
  names = [s.name for s in subsets]
  if not names:
    raise ArcDataError("no subsets given")
  if len(set(names)) != len(names):
    raise ArcDataError(f"subsets {names} name a subset twice")
  if test_set_name not in names:
    raise ArcDataError(f"test set {test_set_name!r} is not one of the subsets {names}")
  if num_aug < 0:
    raise ArcDataError(f"num_aug must be >= 0, got {num_aug}")
  if limit_puzzles is not None and limit_puzzles < 1:
    raise ArcDataError(f"limit_puzzles must be >= 1, got {limit_puzzles}")
  warnings = WarningCounter()
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)

  # Pass 1: read everything (small), shuffle each subset and draw the
  # augmentation plans, in the original's order of random draws.
  words = _RandomWords(seed)
  ordered: list[tuple[Puzzle, AugmentPlan]] = []
  seen_ids: dict[str, str] = {}
  for files in subsets:
    puzzles = load_subset(files, is_test_set=files.name == test_set_name,
                          allow_missing_test_solutions=allow_missing_test_solutions,
                          limit_puzzles=limit_puzzles, warnings=warnings)
    for p in puzzles:
      if p.id in seen_ids:
        warnings("puzzle id in several subsets",
                 f"{files.challenges_path}: puzzle {p.id} also occurs in subset {seen_ids[p.id]!r}; its versions "
                 "share identifiers by name (as in the original)")
      seen_ids.setdefault(p.id, files.name)
    # The original shuffles a list of (id, puzzle) tuples; the draws depend
    # only on the length.
    puzzles = words.shuffle(puzzles)
    for p in puzzles:
      ordered.append((p, plan_augmentations(p, num_aug, words, warnings)))
    log(f"[arc] {files.name}: {len(puzzles)} puzzles planned ({time.time() - t0:.1f}s)")

  # Pass 2: one group at a time, train split first in the random stream.
  identifiers: dict[str, int] = {BLANK_NAME: 0}
  test_puzzles: dict[str, Any] = {}
  with common.DatasetWriter(output_dir, overwrite=overwrite, examples_per_shard=examples_per_shard) as ds:
    train_w = ds.set_writer("train", SET_NAME, SEQ_LEN, VOCAB_SIZE)
    test_w = ds.set_writer("test", SET_NAME, SEQ_LEN, VOCAB_SIZE)
    for gi, (puzzle, plan) in enumerate(ordered):
      tids = np.concatenate([[0], plan.tids]).astype(np.int64)
      mappings = np.concatenate([IDENTITY_MAPPING[None], plan.mappings])
      ids = [identifiers.setdefault(puzzle.id, len(identifiers))]
      for t, m in zip(plan.tids.tolist(), plan.mappings):
        ids.append(identifiers.setdefault(aug_name(puzzle.id, t, m), len(identifiers)))
      for test, writer in ((False, train_w), (True, test_w)):
        pairs = puzzle.split_pairs(test)
        if not pairs:
          continue
        tokens = group_tokens(pairs, tids, mappings, None if test else words)
        for v, ident in enumerate(ids):
          writer.add_puzzle(tokens[v, :, 0], tokens[v, :, 1], ident)
        writer.end_group()
      if puzzle.raw is not None:
        test_puzzles[puzzle.id] = puzzle.raw
      if verbose and (gi + 1) % 100 == 0:
        log(f"[arc] {gi + 1}/{len(ordered)} groups written ({time.time() - t0:.1f}s)")

    builder = {"builder": "data_prep.arc", "subsets": names, "test_set_name": test_set_name,
               "num_aug": num_aug, "seed": seed, "limit_puzzles": limit_puzzles}
    for split in ("train", "test"):
      ds.finish_split(split, task="arc", num_puzzle_identifiers=len(identifiers), pad_id=PAD_ID, ignore_label_id=PAD_ID,
                      blank_identifier_id=0, extra={"source": builder})
    ds.write_json(common.IDENTIFIERS_FILE, list(identifiers))
    ds.write_json(common.TEST_PUZZLES_FILE, test_puzzles)
    examples = {"train": train_w.num_examples, "test": test_w.num_examples}

  stats = BuildStats(total_puzzles=len(ordered), num_identifiers=len(identifiers), examples=examples,
                     seconds=time.time() - t0, warnings=warnings.summary())
  log(f"[arc] done: {stats.total_puzzles} puzzles, {stats.num_identifiers} identifiers, examples "
      f"{stats.examples}, {stats.seconds:.1f}s")
  if warnings.counts:
    common.warn(f"{sum(warnings.counts.values())} warning(s): {stats.warnings}")
  return stats


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m data_prep.arc",
      description="Build the augmented ARC-AGI dataset (SPEC §7) in the trm-jax format.")
  p.add_argument("--input-file-prefix", default=default_input_prefix(),
                 help="files are <prefix>_<subset>_{challenges,solutions}.json[.xz] (default: the files "
                      "shipped in data_prep/raw/arc)")
  p.add_argument("--subsets", nargs="+", default=None,
                 help="subsets in build order (default: training evaluation concept = ARC-AGI-1; ARC-AGI-2 is "
                      "training2 evaluation2 concept)")
  p.add_argument("--test-set-name", default=None,
                 help="the subset whose test pairs form the test split (default: evaluation)")
  p.add_argument("--challenges-file", default=None,
                 help="instead of --input-file-prefix/--subsets: build from this one challenges file, which is "
                      "also the test set (prediction on any ARC challenges file; solutions optional)")
  p.add_argument("--solutions-file", default=None, help="solutions of --challenges-file, if known")
  p.add_argument("--num-aug", type=int, default=1000, help="augmented versions per puzzle (default: %(default)s)")
  p.add_argument("--seed", type=int, default=42, help="seed of numpy's RandomState (default: %(default)s)")
  p.add_argument("--output-dir", required=True, help="dataset directory to create")
  p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
  p.add_argument("--allow-missing-test-solutions", action="store_true",
                 help="build even if the test set has no solutions file (for prediction only: dummy "
                      "labels, and test_puzzles.json without outputs)")
  p.add_argument("--limit-puzzles", type=int, default=None,
                 help="debugging and tests: use only the first N puzzles (file order) of each subset")
  p.add_argument("--examples-per-shard", type=int, default=common.DEFAULT_EXAMPLES_PER_SHARD,
                 help="examples per ArrayRecord shard (default: %(default)s)")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  return p.parse_args(argv)




def _subsets_from_args(args: argparse.Namespace) -> tuple[list[SubsetFiles], str, bool]:
  """-> (subsets, test set name, allow missing test solutions); ArcDataError on bad flags."""
  if args.challenges_file is not None:
    if args.subsets is not None or args.test_set_name is not None:
      raise ArcDataError("--challenges-file replaces --subsets and --test-set-name; pass one or the other")
    challenges = pathlib.Path(args.challenges_file)
    if not common.input_exists(challenges):
      raise ArcDataError(f"{challenges}: challenges file not found (--challenges-file)")
    solutions = pathlib.Path(args.solutions_file) if args.solutions_file else None
    if solutions is not None and not common.input_exists(solutions):
      raise ArcDataError(f"{solutions}: solutions file not found (--solutions-file)")
    return [SubsetFiles(PREDICT_SUBSET_NAME, challenges, solutions)], PREDICT_SUBSET_NAME, solutions is None
  if args.solutions_file is not None:
    raise ArcDataError("--solutions-file goes with --challenges-file")
  names = args.subsets if args.subsets is not None else ["training", "evaluation", "concept"]
  test_set = args.test_set_name if args.test_set_name is not None else "evaluation"
  prefix = pathlib.Path(args.input_file_prefix)
  subsets = [SubsetFiles.from_prefix(args.input_file_prefix, name) for name in names]
  for s in subsets:
    if not common.input_exists(s.challenges_path):
      pattern = f"{prefix.name}_*_challenges.json*"
      avail = sorted({p.name[len(prefix.name) + 1:].split("_challenges.json")[0]
                      for p in prefix.parent.glob(pattern)})
      raise ArcDataError(f"unknown subset {s.name!r}: {s.challenges_path} not found (subsets with this prefix: "
                         f"{', '.join(avail) or 'none'})")
  return subsets, test_set, args.allow_missing_test_solutions


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    subsets, test_set, allow_missing = _subsets_from_args(args)
    build_arc_dataset(subsets, test_set, args.output_dir, num_aug=args.num_aug, seed=args.seed,
                      overwrite=args.overwrite, limit_puzzles=args.limit_puzzles,
                      allow_missing_test_solutions=allow_missing,
                      examples_per_shard=args.examples_per_shard, verbose=not args.quiet)
  except (ArcDataError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
