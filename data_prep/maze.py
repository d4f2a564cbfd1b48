"""Maze-Hard datasets: from the original CSVs or generated.

``python -m data_prep.maze {csv,generate} --help``.

Grids are ``n x n`` characters of ``CHARSET = "# SGo"`` (wall, open, start,
goal, path), tokens 1..5 (0 is padding), seq_len ``n*n``, vocab 6, puzzle
identifier 0. A question holds one ``S`` and one ``G``; its answer is the
question with the cells of one shortest 4-connected S->G path marked ``o``;
``S`` and ``G`` themselves stay ``S`` and ``G`` (the convention of the
Maze-Hard data, as far as can be told without it: the original builder only
maps characters, and every third-party loader we read keeps them). Each maze
is one group; with ``--aug`` the train split gets the 8 dihedral transforms
of each maze as the group's 8 puzzles (SPEC §7), one example each.

* ``csv``: the original's ``train.csv``/``test.csv`` (``source,question,
  answer,rating`` after a header). With the same ``--seed``, the train
  subsample is the original builder's after ``np.random.seed(seed)``.
* ``generate``: Maze-Hard-like mazes (see ``generate_mazes``); Python API
  ``build_generated``.

Metadata: like the original, ``total_groups`` = mazes and
``mean_puzzle_examples`` = 1; ``total_puzzles`` is the true count (the original
writes the group count there), so ``total_groups * mean_puzzle_examples``, and
so the trainer's step count, is the original's.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import pathlib
import sys
import time
from typing import Sequence

import numba
import numpy as np

from data_prep import common
from trm_jax import errors
from trm_jax.tasks import dihedral
# The maze task's tokens and its "valid and shortest" check (``trm_jax.tasks.maze``), named here as before.
from trm_jax.tasks.maze import (  # pylint: disable=unused-import
    GOAL, OPEN, PAD, PATH, START, VOCAB_SIZE, WALL, shortest_path_lengths, valid_shortest_path)
from trm_jax.tasks.maze import DIRS as _DIRS
from trm_jax.tasks.maze import bfs as _bfs

CHARSET = "# SGo"
CSV_HEADER = ("source", "question", "answer", "rating")
DEFAULT_GRID_SIZE = 30
DEFAULT_WALL_FRACTION = (0.3, 0.5)
DEFAULT_MIN_PATH_LENGTH = 110

_CHAR_TO_TOKEN = np.zeros(256, np.uint8)  # 0: not a maze character
_CHAR_TO_TOKEN[[ord(c) for c in CHARSET]] = np.arange(1, len(CHARSET) + 1)
_TOKEN_TO_CHAR = np.frombuffer(("?" + CHARSET).encode(), np.uint8)


class InputError(errors.UserError, ValueError):
  """Bad user input (a file, a row, a flag); the CLI prints it on one line."""


# ---------------------------------------------------------------------------
# The label's path (numba).


@numba.njit(cache=True, nogil=True)
def _mark_path(tokens, n, start, goal, dist_to_goal):
  """Marks one shortest path start->goal with PATH (start/goal untouched).

  From the start, always step to the first neighbour, in the order up, down,
  left, right, whose distance to the goal is one less.
  """
  c = start
  while c != goal:
    r = c // n
    k = c % n
    for j in range(4):
      rr = r + _DIRS[j, 0]
      kk = k + _DIRS[j, 1]
      if 0 <= rr < n and 0 <= kk < n:
        nb = rr * n + kk
        if dist_to_goal[nb] == dist_to_goal[c] - 1 and dist_to_goal[nb] >= 0:
          c = nb
          break
    if c != goal:
      tokens[c] = 5  # PATH


def solve_maze(inputs_S: np.ndarray, grid_size: int) -> np.ndarray:
  """One maze's label: the input with the tie-broken shortest path marked (``_mark_path``)."""
  inp = np.asarray(inputs_S, np.int64).reshape(-1)
  size = grid_size * grid_size
  s, g = np.flatnonzero(inp == START), np.flatnonzero(inp == GOAL)
  if len(s) != 1 or len(g) != 1:
    raise ValueError("a maze needs exactly one start and one goal")
  dist = np.empty(size, np.int32)
  _bfs((inp != WALL).astype(np.uint8), grid_size, int(g[0]), dist, np.empty(size, np.int64))
  if dist[s[0]] < 0:
    raise ValueError("the goal cannot be reached from the start")
  out = inp.copy()
  _mark_path(out, grid_size, int(s[0]), int(g[0]), dist)
  return out


# ---------------------------------------------------------------------------
# Generator.


@numba.njit(cache=True, nogil=True)
def _generate_one(seed, n, lo, hi, min_len, max_grids, starts_per_grid, grid, label, dist, queue,
                  perm):
  """One maze into ``grid``/``label`` (tokens); returns its path length, or -1 if none found."""
  np.random.seed(seed)
  size = n * n
  passable = np.empty(size, np.uint8)
  for _ in range(max_grids):
    num_walls = int(np.round((lo + (hi - lo) * np.random.random()) * size))
    # Walls at the first num_walls places of a partial Fisher-Yates shuffle.
    for c in range(size):
      perm[c] = c
      passable[c] = 1
    for i in range(num_walls):
      j = np.random.randint(i, size)
      perm[i], perm[j] = perm[j], perm[i]
      passable[perm[i]] = 0
    num_open = size - num_walls
    if num_open < 2:
      continue
    # Double sweep from a random open cell: a lower bound on the diameter of
    # its component; grids where it is too short are skipped (cheaply).
    s0 = perm[num_walls + np.random.randint(0, num_open)]
    _bfs(passable, n, s0, dist, queue)
    far = s0
    for c in range(size):
      if dist[c] > dist[far]:
        far = c
    _bfs(passable, n, far, dist, queue)
    longest = 0
    for c in range(size):
      longest = max(longest, dist[c])
    if longest <= min_len:
      continue
    for _ in range(starts_per_grid):
      start = perm[num_walls + np.random.randint(0, num_open)]
      _bfs(passable, n, start, dist, queue)
      num_far = 0
      for c in range(size):
        if dist[c] > min_len:
          num_far += 1
      if num_far == 0:
        continue
      pick = np.random.randint(0, num_far)
      goal = -1
      for c in range(size):
        if dist[c] > min_len:
          if pick == 0:
            goal = c
            break
          pick -= 1
      length = dist[goal]
      for c in range(size):
        grid[c] = 2 if passable[c] else 1  # OPEN / WALL
      grid[start] = 3  # START
      grid[goal] = 4  # GOAL
      label[:] = grid
      _bfs(passable, n, goal, dist, queue)
      _mark_path(label, n, start, goal, dist)
      return length
  return -1


@numba.njit(cache=True, nogil=True)
def _generate_batch(seeds, n, lo, hi, min_len, max_grids, starts_per_grid, inputs, labels,
                    lengths):
  size = n * n
  dist = np.empty(size, np.int32)
  queue = np.empty(size, np.int64)
  perm = np.empty(size, np.int64)
  for i in range(seeds.shape[0]):
    lengths[i] = _generate_one(seeds[i], n, lo, hi, min_len, max_grids, starts_per_grid,
                               inputs[i], labels[i], dist, queue, perm)


def generate_mazes(rng: np.random.Generator, num: int, grid_size: int = DEFAULT_GRID_SIZE,
                   wall_fraction: tuple[float, float] = DEFAULT_WALL_FRACTION,
                   min_path_length: int = DEFAULT_MIN_PATH_LENGTH,
                   starts_per_grid: int = 64, max_grids_per_maze: int = 200_000):
  """Random mazes whose shortest S->G path is longer than ``min_path_length`` steps.

  Per maze, numba's generator is seeded with a number drawn from ``rng``;
  then per attempt: a wall fraction ``f ~ U(wall_fraction)`` and exactly
  ``round(f * n * n)`` walls at uniformly random cells. A double-sweep BFS
  from a random open cell bounds the longest path of its component from
  below; if that is not longer than ``min_path_length`` the grid is redrawn
  (random walls rarely make long paths: about 1 grid in 100-300 passes at
  30x30). Otherwise up to ``starts_per_grid`` times: a uniformly random open
  start, a BFS from it, and the goal drawn uniformly from the cells farther
  than ``min_path_length`` steps (if there are any). A redrawn grid redraws
  ``f`` too, so accepted mazes lean towards fractions where long paths are
  likely. The label marks the shortest path that ``_mark_path``'s tie-break
  picks; S and G stay S and G.

  Returns ``(inputs [num, n*n] uint8, labels [num, n*n] uint8, path_lengths [num])``.
  """
  n = int(grid_size)
  lo, hi = (float(x) for x in wall_fraction)
  if n < 2 or not 0.0 <= lo <= hi < 1.0 or min_path_length < 0:
    raise InputError(f"bad maze parameters: grid {n}, wall fraction {wall_fraction} (need "
                     f"0 <= min <= max < 1), min path length {min_path_length}")
  size = n * n
  seeds = rng.integers(0, 2**31 - 1, size=num)
  inputs = np.zeros((num, size), np.uint8)
  labels = np.zeros((num, size), np.uint8)
  lengths = np.zeros(num, np.int64)
  if num:
    _generate_batch(seeds, n, lo, hi, int(min_path_length), int(max_grids_per_maze),
                    int(starts_per_grid), inputs, labels, lengths)
  if (lengths < 0).any():
    raise InputError(f"no {n}x{n} maze with a path longer than {min_path_length} steps in "
                     f"{max_grids_per_maze} grids; lower --min-path-length or change the wall "
                     "fraction")
  return inputs, labels, lengths


def dihedral_keys(inputs_NxS: np.ndarray, grid_size: int) -> list[bytes]:
  """A key per maze equal for mazes that are dihedral transforms of each other."""
  out = []
  for inp in np.asarray(inputs_NxS, np.uint8).reshape(-1, grid_size, grid_size):
    versions = (np.ascontiguousarray(dihedral.dihedral_transform(inp, t)).tobytes()
                for t in range(dihedral.NUM_DIHEDRAL))
    out.append(min(hashlib.blake2b(v, digest_size=16).digest() for v in versions))
  return out


# ---------------------------------------------------------------------------
# CSV.


def read_maze_csv(path: str | os.PathLike, grid_size: int = DEFAULT_GRID_SIZE):
  """Reads an original-format maze CSV; checks every row.

  Row checks: 4 columns; question and answer of ``grid_size**2`` characters
  from ``"# SGo"``; one ``S``, one ``G`` and no ``o`` in the question; the
  answer equal to the question except ``o`` on open (or S/G) cells.

  Returns ``(inputs [N, n*n] uint8, labels [N, n*n] uint8)`` as tokens.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  size = grid_size * grid_size
  inputs, labels = [], []
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise InputError(f"{path}: empty file, expected a header line {','.join(CSV_HEADER)}")
    if len(header) == 4 and len(header[1]) == size:
      raise InputError(f"{path}:1: expected the header line {','.join(CSV_HEADER)}, got a data row")
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if len(row) != 4:
        raise InputError(f"{where}: {len(row)} columns, expected 4 ({','.join(CSV_HEADER)})")
      _, q, a, _ = row
      toks = []
      for name, s in (("question", q), ("answer", a)):
        if len(s) != size:
          raise InputError(f"{where}: {name} has {len(s)} characters, expected {size} "
                           f"(a {grid_size}x{grid_size} grid; see --grid-size)")
        raw = np.frombuffer(s.encode("ascii", errors="replace"), np.uint8)
        t = _CHAR_TO_TOKEN[raw]
        if (t == 0).any():
          bad = "".join(sorted({ch for ch in s if ch not in CHARSET}))
          raise InputError(
              f"{where}: {name} has illegal character(s) {bad!r}, expected {CHARSET!r}")
        toks.append(t)
      qt, at = toks
      for name, tok in (("S", START), ("G", GOAL)):
        cnt = int((qt == tok).sum())
        if cnt != 1:
          raise InputError(f"{where}: question has {cnt} '{name}' cells, expected exactly one")
      if (qt == PATH).any():
        raise InputError(f"{where}: question has 'o' (path) cells; only the answer may")
      marked = at == PATH
      if ((at != qt) & ~marked).any() or (marked & ((qt == WALL))).any():
        raise InputError(
            f"{where}: answer differs from the question other than by 'o' on open cells")
      inputs.append(qt)
      labels.append(at)
  if not inputs:
    return np.zeros((0, size), np.uint8), np.zeros((0, size), np.uint8)
  return np.stack(inputs), np.stack(labels)


def write_maze_csv(path: str | os.PathLike, inputs: np.ndarray, labels: np.ndarray,
                   ratings: np.ndarray, source: str = "generated") -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(CSV_HEADER)
    for q, a, r in zip(inputs, labels, ratings):
      w.writerow([source, _TOKEN_TO_CHAR[q].tobytes().decode(),
                  _TOKEN_TO_CHAR[a].tobytes().decode(), int(r)])
  tmp.rename(path)


# ---------------------------------------------------------------------------
# Writing and builders.


def write_dataset(output_dir, grid_size: int, train: tuple[np.ndarray, np.ndarray],
                  test: tuple[np.ndarray, np.ndarray], aug: bool, overwrite: bool = False,
                  extra: dict | None = None) -> dict[str, common.DatasetMetadata]:
  """Writes both splits; with ``aug`` each train maze's group holds its 8 dihedral versions."""
  n = int(grid_size)
  metas = {}
  with common.DatasetWriter(output_dir, overwrite=overwrite) as ds:
    for split, (inputs, labels), do_aug in (("train", train, aug), ("test", test, False)):
      w = ds.set_writer(split, "all", n * n, VOCAB_SIZE)
      for inp, lab in zip(inputs, labels):
        gi = np.asarray(inp).reshape(n, n)
        gl = np.asarray(lab).reshape(n, n)
        for t in range(dihedral.NUM_DIHEDRAL if do_aug else 1):
          w.add_puzzle(dihedral.dihedral_transform(gi, t).reshape(1, -1),
                       dihedral.dihedral_transform(gl, t).reshape(1, -1), 0)
        w.end_group()
      info = {"grid_size": n, "aug": bool(do_aug)}
      if extra:
        info.update(extra)
      metas[split] = ds.finish_split(split, task="maze", num_puzzle_identifiers=1, mean_puzzle_examples=1.0,
                                     extra=info)
    ds.write_json(common.IDENTIFIERS_FILE, ["<blank>"])
  return metas


def build_from_csv(output_dir, train_csv, test_csv, *, grid_size=DEFAULT_GRID_SIZE,
                   subsample_size=None, aug=False, seed=0, overwrite=False):
  """The original builder's dataset from its CSVs (same subsample for the same seed)."""
  if subsample_size is not None and subsample_size < 0:
    raise InputError(f"--subsample-size must be >= 0, got {subsample_size}")
  rs = np.random.RandomState(seed)
  tr = read_maze_csv(train_csv, grid_size)
  te = read_maze_csv(test_csv, grid_size)
  if subsample_size is not None and subsample_size < len(tr[0]):
    pick = rs.choice(len(tr[0]), size=subsample_size, replace=False)
    tr = (tr[0][pick], tr[1][pick])
  extra = {"builder": "csv", "seed": seed, "sources": [str(train_csv), str(test_csv)],
           "subsample_size": subsample_size}
  return write_dataset(output_dir, grid_size, tr, te, aug, overwrite, extra)


def build_generated(output_dir, num_train=1000, num_test=1000, *, grid_size=DEFAULT_GRID_SIZE,
                    wall_fraction=DEFAULT_WALL_FRACTION, min_path_length=DEFAULT_MIN_PATH_LENGTH,
                    aug=False, seed=0, overwrite=False, write_csv_dir=None):
  """Generates mazes (``generate_mazes``, ``np.random.default_rng(seed)``) and builds a dataset.

  Test mazes are drawn first; a train maze equal to a test maze or to an
  earlier train maze up to a dihedral transform is replaced by a new draw.
  A small variant, e.g. ``grid_size=10, min_path_length=14``, suits a
  quickstart. Returns the per-split ``DatasetMetadata``.
  """
  for name, v in (("num_train", num_train), ("num_test", num_test)):
    if not isinstance(v, (int, np.integer)) or v < 0:
      raise InputError(f"--{name.replace('_', '-')} must be a non-negative integer, got {v!r}")
  rng = np.random.default_rng(seed)
  kw = dict(grid_size=grid_size, wall_fraction=wall_fraction, min_path_length=min_path_length)
  te_in, te_lab, te_len = generate_mazes(rng, num_test, **kw)
  seen = set(dihedral_keys(te_in, grid_size))
  tr_in, tr_lab, tr_len = [], [], []
  while len(tr_in) < num_train:
    need = num_train - len(tr_in)
    x, y, ln = generate_mazes(rng, need, **kw)
    for xi, yi, li, k in zip(x, y, ln, dihedral_keys(x, grid_size)):
      if k not in seen:
        seen.add(k)
        tr_in.append(xi)
        tr_lab.append(yi)
        tr_len.append(li)
  size = grid_size * grid_size
  tr = (np.asarray(tr_in, np.uint8).reshape(-1, size),
        np.asarray(tr_lab, np.uint8).reshape(-1, size))
  if write_csv_dir is not None:
    write_maze_csv(pathlib.Path(write_csv_dir) / "train.csv", tr[0], tr[1], tr_len)
    write_maze_csv(pathlib.Path(write_csv_dir) / "test.csv", te_in, te_lab, te_len)
  extra = {"builder": "generate", "seed": seed, "wall_fraction": list(wall_fraction),
           "min_path_length": min_path_length}
  return write_dataset(output_dir, grid_size, tr, (te_in, te_lab), aug, overwrite, extra)


# ---------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m data_prep.maze",
                              description="Build a Maze-Hard dataset "
                              "(ArrayRecord shards + dataset.json).")
  sub = p.add_subparsers(dest="mode", required=True, metavar="{csv,generate}")

  def common_flags(sp, default_out):
    common.add_output_flags(sp, default_out)
    sp.add_argument("--aug", action="store_true", help="8 dihedral versions of each train maze")
    sp.add_argument("--grid-size", type=int, default=DEFAULT_GRID_SIZE,
                    help="grid side n (default %(default)s)")

  sp = sub.add_parser("csv", help="from the original train.csv/test.csv",
                      description="From CSVs in the original format "
                      "(source,question,answer,rating).")
  common_flags(sp, "data/maze-30x30-hard-1k")
  common.add_csv_input_flags(sp)
  sp.add_argument("--subsample-size", type=int, default=None, help="sample this many train mazes")

  sp = sub.add_parser("generate", help="generate Maze-Hard-like mazes",
                      description="Generate random-wall mazes with a long shortest path and "
                      "build a dataset; labels mark one shortest path (fixed tie-break).")
  common_flags(sp, "data/maze-generated")
  sp.add_argument("--num-train", type=int, default=1000, help="train mazes (default %(default)s)")
  sp.add_argument("--num-test", type=int, default=1000, help="test mazes (default %(default)s)")
  sp.add_argument("--min-wall-fraction", type=float, default=DEFAULT_WALL_FRACTION[0],
                  help="lowest wall fraction (default %(default)s)")
  sp.add_argument("--max-wall-fraction", type=float, default=DEFAULT_WALL_FRACTION[1],
                  help="highest wall fraction (default %(default)s)")
  sp.add_argument("--min-path-length", type=int, default=DEFAULT_MIN_PATH_LENGTH,
                  help="the shortest S->G path must be longer than this many steps "
                  "(default %(default)s)")
  sp.add_argument("--write-csv", default=None, metavar="DIR",
                  help="also write the mazes as original-format train.csv/test.csv to DIR")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  t0 = time.time()
  try:
    if args.grid_size < 2:
      raise InputError(f"--grid-size must be >= 2, got {args.grid_size}")
    if args.mode == "csv":
      try:
        train_csv, test_csv = common.csv_inputs(args.input_dir, args.train_csv, args.test_csv)
      except ValueError as e:
        raise InputError(str(e)) from None
      metas = build_from_csv(args.output_dir, train_csv, test_csv, grid_size=args.grid_size,
                             subsample_size=args.subsample_size, aug=args.aug, seed=args.seed,
                             overwrite=args.overwrite)
    else:
      metas = build_generated(args.output_dir, args.num_train, args.num_test,
                              grid_size=args.grid_size,
                              wall_fraction=(args.min_wall_fraction, args.max_wall_fraction),
                              min_path_length=args.min_path_length, aug=args.aug, seed=args.seed,
                              overwrite=args.overwrite, write_csv_dir=args.write_csv)
  except (InputError, FileExistsError, common.DatasetFormatError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  common.print_build_summary(metas, args.output_dir, time.time() - t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
