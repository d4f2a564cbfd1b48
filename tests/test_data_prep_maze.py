"""Tests of data_prep.maze: generator, labels, the valid-shortest-path check, CSV and builders."""
import collections
import csv
import json

import numpy as np
import pytest

from data_prep import common
from data_prep import maze
from trm_jax.tasks import dihedral

N = 30


def bfs_distances(grid_nxn, source):
  """Reference BFS (plain Python) over non-wall cells."""
  n = grid_nxn.shape[0]
  dist = np.full((n, n), -1)
  dist[source] = 0
  q = collections.deque([source])
  while q:
    r, c = q.popleft()
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
      rr, cc = r + dr, c + dc
      if 0 <= rr < n and 0 <= cc < n and grid_nxn[rr, cc] != maze.WALL and dist[rr, cc] < 0:
        dist[rr, cc] = dist[r, c] + 1
        q.append((rr, cc))
  return dist


def path_is_shortest(inp, lab, n):
  """Independent check of a label: S/G kept, 'o' cells on open cells forming a shortest path."""
  g_in, g_lab = inp.reshape(n, n), lab.reshape(n, n)
  s = tuple(np.argwhere(g_in == maze.START)[0])
  g = tuple(np.argwhere(g_in == maze.GOAL)[0])
  d = bfs_distances(g_in, s)[g]
  marked = g_lab == maze.PATH
  if ((g_lab != g_in) & ~marked).any() or (marked & (g_in != maze.OPEN)).any():
    return False
  if marked.sum() != d - 1:
    return False
  # Walk from S through marked cells: each step must go to the unique next marked cell.
  cur, seen = s, {s}
  for _ in range(d - 1):
    nxt = [(cur[0] + dr, cur[1] + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
           if 0 <= cur[0] + dr < n and 0 <= cur[1] + dc < n and marked[cur[0] + dr, cur[1] + dc]
           and (cur[0] + dr, cur[1] + dc) not in seen]
    if len(nxt) != 1:
      return False
    cur = nxt[0]
    seen.add(cur)
  return abs(cur[0] - g[0]) + abs(cur[1] - g[1]) == 1 or d == 1


@pytest.fixture(scope="module")
def mazes():
  return maze.generate_mazes(np.random.default_rng(0), 12)


def read_all(split_dir):
  split = common.load_split(split_dir)
  reader = common.ExampleReader(split, "all")
  inputs, labels = reader[np.arange(len(reader))]
  reader.close()
  return split, inputs.astype(np.int64), labels.astype(np.int64)


def test_generator_properties(mazes):
  inputs, labels, lengths = mazes
  assert inputs.shape == labels.shape == (12, N * N)
  walls = (inputs == maze.WALL).sum(1) / (N * N)
  assert (walls >= 0.3 - 1e-9).all() and (walls <= 0.5 + 1e-9).all()
  assert ((inputs == maze.START).sum(1) == 1).all() and ((inputs == maze.GOAL).sum(1) == 1).all()
  assert set(np.unique(inputs)) <= {1, 2, 3, 4}
  assert (lengths > 110).all()
  for inp, lab, ln in zip(inputs, labels, lengths):
    s = tuple(np.argwhere(inp.reshape(N, N) == maze.START)[0])
    g = tuple(np.argwhere(inp.reshape(N, N) == maze.GOAL)[0])
    assert bfs_distances(inp.reshape(N, N), s)[g] == ln
    assert path_is_shortest(inp, lab, N)
  np.testing.assert_array_equal(maze.shortest_path_lengths(inputs, N), lengths)
  np.testing.assert_array_equal(maze.generate_mazes(np.random.default_rng(0), 12)[0], inputs)
  assert not np.array_equal(maze.generate_mazes(np.random.default_rng(1), 2)[0], inputs[:2])


def test_small_variant_and_tie_break():
  x, y, ln = maze.generate_mazes(np.random.default_rng(4), 50, grid_size=8,
                                 wall_fraction=(0.2, 0.3), min_path_length=10)
  assert (ln > 10).all() and x.shape == (50, 64)
  assert all(path_is_shortest(a, b, 8) for a, b in zip(x, y))
  # Open 3x3, S top-left, G bottom-right: up, down, left, right order goes down first.
  grid = np.full(9, maze.OPEN)
  grid[0], grid[8] = maze.START, maze.GOAL
  lab = maze.solve_maze(grid, 3).reshape(3, 3)
  np.testing.assert_array_equal(lab, [[3, 2, 2], [5, 2, 2], [5, 5, 4]])


def alternative_path(inp, n):
  """A shortest path with the opposite tie-break (right, left, down, up)."""
  g_in = inp.reshape(n, n)
  s = tuple(np.argwhere(g_in == maze.START)[0])
  g = tuple(np.argwhere(g_in == maze.GOAL)[0])
  dist = bfs_distances(g_in, g)
  out = g_in.copy()
  cur = s
  while cur != g:
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
      rr, cc = cur[0] + dr, cur[1] + dc
      if 0 <= rr < n and 0 <= cc < n and dist[rr, cc] == dist[cur] - 1 and dist[rr, cc] >= 0:
        cur = (rr, cc)
        break
    if cur != g:
      out[cur] = maze.PATH
  return out.reshape(-1)


def test_valid_shortest_path(mazes):
  inputs, labels, _ = mazes
  assert maze.valid_shortest_path(inputs, labels, N).all()
  alts = np.stack([alternative_path(x, N) for x in inputs])
  assert (alts != labels).any(axis=1).sum() >= 6  # the alternatives really differ
  assert maze.valid_shortest_path(inputs, alts, N).all()
  # Exact match would reject those alternatives; here is what must be rejected.
  bad = []
  for inp, lab in zip(inputs[:4], labels[:4]):
    path_cells = np.flatnonzero(lab == maze.PATH)
    open_cells = np.flatnonzero(inp == maze.OPEN)
    free = np.setdiff1d(open_cells, path_cells)
    broken = lab.copy()
    broken[path_cells[len(path_cells) // 2]] = maze.OPEN  # a gap
    extra = lab.copy()
    extra[free[0]] = maze.PATH  # one stray mark
    on_wall = lab.copy()
    on_wall[np.flatnonzero(inp == maze.WALL)[0]] = maze.PATH
    no_start = lab.copy()
    no_start[inp == maze.START] = maze.OPEN
    wall_gone = lab.copy()
    wall_gone[np.flatnonzero(inp == maze.WALL)[0]] = maze.OPEN
    empty = inp.copy()
    bad += [broken, extra, on_wall, no_start, wall_gone, empty]
  bad_inputs = np.repeat(inputs[:4], 6, axis=0)
  assert not maze.valid_shortest_path(bad_inputs, np.stack(bad), N).any()
  # A longer path (a detour) on an open 4x4: S (0,0), G (0,3); shortest is 3 steps.
  g = np.full((4, 4), maze.OPEN)
  g[0, 0], g[0, 3] = maze.START, maze.GOAL
  shortest, detour, alt = g.copy(), g.copy(), g.copy()
  shortest[0, 1:3] = maze.PATH
  detour[1, 0:4] = maze.PATH  # S down, right x3, up to G: 5 steps
  alt[1, 1:3] = maze.PATH
  alt[0, 1] = maze.PATH  # 4 marks, not a shortest path
  preds = np.stack([shortest.ravel(), detour.ravel(), alt.ravel()])
  ok = maze.valid_shortest_path(np.stack([g.ravel()] * 3), preds, 4)
  np.testing.assert_array_equal(ok, [True, False, False])
  # Padding rows (all 0, as the evaluator pads the last batch) and unsolvable mazes are False.
  walled = g.copy()
  walled[:, 1] = maze.WALL
  assert not maze.valid_shortest_path(np.stack([np.zeros(16), walled.ravel()]),
                                      np.stack([np.zeros(16), walled.ravel()]), 4).any()
  with pytest.raises(ValueError, match="must both be"):
    maze.valid_shortest_path(inputs, labels[:, :-1], N)


def test_csv_round_trip(mazes, tmp_path):
  inputs, labels, lengths = mazes
  maze.write_maze_csv(tmp_path / "train.csv", inputs[:8], labels[:8], lengths[:8])
  maze.write_maze_csv(tmp_path / "test.csv", inputs[8:], labels[8:], lengths[8:])
  header = (tmp_path / "train.csv").read_text().splitlines()[0]
  assert header == "source,question,answer,rating"
  x, y = maze.read_maze_csv(tmp_path / "train.csv")
  np.testing.assert_array_equal(x, inputs[:8])
  np.testing.assert_array_equal(y, labels[:8])
  assert maze.main(["csv", "--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "ds"),
                    "--aug", "--subsample-size", "5", "--seed", "3"]) == 0
  assert json.loads((tmp_path / "ds" / "identifiers.json").read_text()) == ["<blank>"]
  tr, tr_in, tr_lab = read_all(tmp_path / "ds" / "train")
  te, te_in, te_lab = read_all(tmp_path / "ds" / "test")
  for info, groups, per in ((tr, 5, 8), (te, 4, 1)):
    m = info.metadata
    assert (m.seq_len, m.vocab_size, m.num_puzzle_identifiers, m.total_groups,
            m.total_puzzles, m.mean_puzzle_examples) == (900, 6, 1, groups, groups * per, 1.0)
    np.testing.assert_array_equal(info.sets["all"].group_indices, np.arange(groups + 1) * per)
    np.testing.assert_array_equal(info.sets["all"].puzzle_indices, np.arange(groups * per + 1))
  pick = np.random.RandomState(3).choice(8, size=5, replace=False)
  for gi, i in enumerate(pick):
    for t in range(8):
      row = gi * 8 + t
      np.testing.assert_array_equal(tr_in[row].reshape(N, N),
                                    dihedral.dihedral_transform(inputs[i].reshape(N, N), t))
      np.testing.assert_array_equal(tr_lab[row].reshape(N, N),
                                    dihedral.dihedral_transform(labels[i].reshape(N, N), t))
  np.testing.assert_array_equal(te_in, inputs[8:])
  np.testing.assert_array_equal(te_lab, labels[8:])
  # Dihedral transforms keep labels valid shortest paths.
  assert maze.valid_shortest_path(tr_in, tr_lab, N).all()


def bad_row(kind, inp, lab):
  q = maze._TOKEN_TO_CHAR[inp].tobytes().decode()
  a = maze._TOKEN_TO_CHAR[lab].tobytes().decode()
  if kind == "short":
    return ["s", q[:-30], a, "1"], "question has 870 characters, expected 900 (a 30x30 grid"
  if kind == "char":
    return ["s", q, "x" + a[1:], "1"], "answer has illegal character(s) 'x'"
  if kind == "no_start":
    return (["s", q.replace("S", " "), a.replace("S", " "), "1"],
            "question has 0 'S' cells, expected exactly one")
  if kind == "two_goals":
    i = q.index(" ")
    q2 = q[:i] + "G" + q[i + 1:]
    return ["s", q2, a, "1"], "question has 2 'G' cells, expected exactly one"
  if kind == "path_in_question":
    return ["s", a, a, "1"], "question has 'o' (path) cells"
  if kind == "path_on_wall":
    i = q.index("#")
    return ["s", q, a[:i] + "o" + a[i + 1:], "1"], "answer differs from the question"
  if kind == "columns":
    return ["s", q, a], "3 columns, expected 4"
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["short", "char", "no_start", "two_goals", "path_in_question",
                                  "path_on_wall", "columns"])
def test_csv_bad_rows(mazes, tmp_path, kind):
  inputs, labels, _ = mazes
  row, message = bad_row(kind, inputs[0], labels[0])
  path = tmp_path / "bad.csv"
  good = bad_row("columns", inputs[1], labels[1])[0] + ["1"]
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(maze.CSV_HEADER)
    w.writerow(good)
    w.writerow(row)
  with pytest.raises(maze.InputError) as e:
    maze.read_maze_csv(path)
  assert f"{path}:3: {message}" in str(e.value)


def test_build_generated_small(tmp_path):
  kw = dict(grid_size=10, min_path_length=14, wall_fraction=(0.25, 0.4), seed=2)
  metas = maze.build_generated(tmp_path / "a", 40, 20, aug=True, write_csv_dir=tmp_path / "csv",
                               **kw)
  assert metas["train"].total_groups == 40 and metas["train"].total_puzzles == 320
  assert metas["test"].total_groups == 20 and metas["test"].total_puzzles == 20
  _, tr_in, tr_lab = read_all(tmp_path / "a" / "train")
  _, te_in, te_lab = read_all(tmp_path / "a" / "test")
  assert tr_in.shape == (320, 100)
  assert maze.valid_shortest_path(tr_in, tr_lab, 10).all()
  assert maze.valid_shortest_path(te_in, te_lab, 10).all()
  assert (maze.shortest_path_lengths(te_in, 10) > 14).all()
  # No train maze is a dihedral transform of a test maze.
  assert not set(maze.dihedral_keys(tr_in[::8], 10)) & set(maze.dihedral_keys(te_in, 10))
  x, _ = maze.read_maze_csv(tmp_path / "csv" / "test.csv", grid_size=10)
  np.testing.assert_array_equal(x, te_in)
  maze.build_generated(tmp_path / "b", 40, 20, aug=True, **kw)
  np.testing.assert_array_equal(read_all(tmp_path / "b" / "train")[1], tr_in)


def test_cli_errors(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    maze.main(["generate", "--help"])
  assert e.value.code == 0
  assert maze.main(["csv", "--train-csv", str(tmp_path / "nope.csv"), "--test-csv", "x",
                    "--output-dir", str(tmp_path / "o")]) == 1
  assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.csv'}: no such file"
  assert maze.main(["generate", "--min-wall-fraction", "0.6", "--max-wall-fraction", "0.5",
                    "--output-dir", str(tmp_path / "o")]) == 1
  assert "wall fraction" in capsys.readouterr().err
  assert maze.main(["generate", "--grid-size", "4", "--min-path-length", "40", "--num-train", "1",
                    "--num-test", "1", "--output-dir", str(tmp_path / "o")]) == 1
  assert "no 4x4 maze with a path longer than 40 steps" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
