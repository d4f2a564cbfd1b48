"""Tests of data_prep.sudoku and data_prep.sudoku_solver on samples of the real lists."""
import csv
import json

import numpy as np
import pytest

from data_prep import common
from data_prep import sudoku
from data_prep import sudoku_solver

LIST_FILES = ("puzzles2_17_clue.txt", "puzzles3_magictour_top1465.txt",
              "puzzles5_forum_hardest_1905_11+.txt", "puzzles6_forum_hardest_1106.txt")
PER_FILE = 60


@pytest.fixture(scope="module")
def real(data_dir):
  """The first PER_FILE puzzles of each list, solved.

  Returns (boards, solutions, solution counts, ratings, index of the file).
  """
  boards, which = [], []
  for i, name in enumerate(LIST_FILES):
    b, _ = sudoku.read_puzzle_list(data_dir / "sudoku" / name)
    boards.append(b[:PER_FILE])
    which += [i] * PER_FILE
  boards = np.concatenate(boards)
  solutions, counts, ratings, _ = sudoku_solver.solve_batch(boards)
  return boards, solutions, counts, ratings, np.asarray(which)


def read_all(split_dir):
  split = common.load_split(split_dir)
  reader = common.ExampleReader(split, "all")
  inputs, labels = reader[np.arange(len(reader))]
  reader.close()
  return split, inputs.astype(np.int64), labels.astype(np.int64)


def deadly_rectangle(solution_81):
  """Four cells (two rows of one band, two columns of two stacks) holding a,b / b,a."""
  s = solution_81.reshape(9, 9)
  for r1 in range(9):
    for r2 in range(r1 + 1, 3 * (r1 // 3) + 3):
      for c1 in range(9):
        for c2 in range(c1 + 1, 9):
          if c1 // 3 != c2 // 3 and s[r1, c1] == s[r2, c2] and s[r1, c2] == s[r2, c1]:
            return [r1 * 9 + c1, r1 * 9 + c2, r2 * 9 + c1, r2 * 9 + c2]
  return None


# ---------------------------------------------------------------------------
# Solver.


def test_solver_solves_real_puzzles(real):
  boards, solutions, counts, ratings, which = real
  assert (counts == 1).all()
  assert sudoku_solver.is_valid_solution(solutions).all()
  assert sudoku_solver.consistent_with_givens(boards, solutions).all()
  # The "hardest" lists need far more guesses than the 17-clue one.
  assert ratings[which == 2].mean() > 5 * ratings[which == 0].mean()
  # Deterministic, whatever the thread count.
  for threads in (1, 3):
    again = sudoku_solver.solve_batch(boards, num_threads=threads)
    np.testing.assert_array_equal(again[0], solutions)
    np.testing.assert_array_equal(again[2], ratings)


def test_solver_counts_solutions(real):
  boards, solutions, _, _, which = real
  # No 16-clue sudoku is unique: dropping any clue of a 17-clue puzzle.
  b = boards[which == 0][:20].copy()
  for row in b:
    row[np.flatnonzero(row)[0]] = 0
  _, counts, _, _ = sudoku_solver.solve_batch(b)
  assert (counts == 2).all()
  # Blanking a deadly rectangle of a full grid leaves exactly two solutions.
  found = 0
  for sol in solutions[:40]:
    cells = deadly_rectangle(sol)
    if cells is None:
      continue
    puzzle = sol.copy()
    puzzle[cells] = 0
    _, counts, _, _ = sudoku_solver.solve_batch(puzzle[None], limit=5)
    assert counts[0] == 2
    found += 1
  assert found >= 5
  # A repeated digit in a row: no solution.
  bad = boards[0].copy()
  givens = np.flatnonzero(bad)
  row_start = 9 * (givens[0] // 9)
  free = [c for c in range(row_start, row_start + 9) if bad[c] == 0][0]
  bad[free] = bad[givens[0]]
  sols, counts, _, _ = sudoku_solver.solve_batch(bad[None])
  assert counts[0] == 0 and (sols[0] == 0).all()


def test_generator_unique_and_minimal():
  q, s, clues = sudoku_solver.generate_batch(np.random.default_rng(3), 30)
  sols, counts, _, _ = sudoku_solver.solve_batch(q)
  assert (counts == 1).all()
  np.testing.assert_array_equal(sols, s)
  assert sudoku_solver.is_valid_solution(s).all()
  np.testing.assert_array_equal((q > 0).sum(1), clues)
  assert 17 <= clues.min() and clues.max() <= 35
  # target_clues=0: minimal, i.e. no clue can go.
  for row in q[:3]:
    for c in np.flatnonzero(row):
      fewer = row.copy()
      fewer[c] = 0
      assert sudoku_solver.solve_batch(fewer[None])[1][0] == 2
  q40, _, c40 = sudoku_solver.generate_batch(np.random.default_rng(3), 10, target_clues=40)
  assert (c40 == 40).all() and ((q40 > 0).sum(1) == 40).all()
  assert (sudoku_solver.solve_batch(q40)[1] == 1).all()
  q_again, _, _ = sudoku_solver.generate_batch(np.random.default_rng(3), 30)
  np.testing.assert_array_equal(q_again, q)
  assert len({r.tobytes() for r in q}) == 30


# ---------------------------------------------------------------------------
# Augmentation and symmetry keys.


def test_augmentations_preserve_validity(real):
  boards, solutions, _, _, _ = real
  rs = np.random.RandomState(0)
  for q, a in zip(boards[::12], solutions[::12]):
    ci, dm = sudoku.draw_shuffles(rs, 8)
    q_aug = sudoku.apply_shuffles(q, ci, dm)
    a_aug = sudoku.apply_shuffles(a, ci, dm)
    assert sudoku_solver.is_valid_solution(a_aug).all()
    assert sudoku_solver.consistent_with_givens(q_aug, a_aug).all()
    np.testing.assert_array_equal((q_aug > 0).sum(1), np.full(8, (q > 0).sum()))
    sols, counts, _, _ = sudoku_solver.solve_batch(q_aug)
    assert (counts == 1).all()
    np.testing.assert_array_equal(sols, a_aug)


def test_shuffle_draw_order_is_the_originals():
  # One shuffle, drawn by hand in the original's order: digit permutation,
  # transpose coin, bands then rows per band, stacks then columns per stack;
  # the board is transposed first, then cell (i, j) takes (row_perm[i], col_perm[j]).
  for seed in range(4):
    ci, dm = sudoku.draw_shuffles(np.random.RandomState(seed), 1)
    rs = np.random.RandomState(seed)
    digits = np.concatenate([[0], rs.permutation(np.arange(1, 10))])
    transpose = rs.rand() < 0.5
    rows = np.concatenate([b * 3 + rs.permutation(3) for b in rs.permutation(3)])
    cols = np.concatenate([s * 3 + rs.permutation(3) for s in rs.permutation(3)])
    board = np.arange(81).reshape(9, 9) % 10
    src = board.T if transpose else board
    expected = digits[src[rows][:, cols]].reshape(-1)
    np.testing.assert_array_equal(sudoku.apply_shuffles(board.reshape(-1), ci, dm)[0], expected)


def test_symmetry_keys_are_invariant(real):
  boards = real[0]
  keys = sudoku.symmetry_invariant_keys(boards)
  assert len(set(keys.tolist())) >= 0.85 * len(boards)  # a few near-isomorphs share keys
  rs = np.random.RandomState(1)
  for b, k in zip(boards, keys):
    ci, dm = sudoku.draw_shuffles(rs, 6)
    np.testing.assert_array_equal(sudoku.symmetry_invariant_keys(sudoku.apply_shuffles(b, ci, dm)),
                                  np.full(6, k))
  # Plain transposes and single swaps, which the random draws may miss.
  g = boards.reshape(-1, 9, 9)
  for variant in (g.transpose(0, 2, 1), g[:, [1, 0, 2, 3, 4, 5, 6, 7, 8]],
                  g[:, :, [0, 1, 2, 6, 7, 8, 3, 4, 5]]):
    np.testing.assert_array_equal(sudoku.symmetry_invariant_keys(variant.reshape(-1, 81)), keys)
  # Changing a given's position (not a symmetry) changes the key for most puzzles.
  moved = boards.copy()
  for row in moved:
    c = np.flatnonzero(row)[0]
    e = np.flatnonzero(row == 0)[-1]
    row[e], row[c] = row[c], 0
  assert (sudoku.symmetry_invariant_keys(moved) != keys).mean() > 0.8


def test_lists_split_is_symmetry_safe(real, tmp_path):
  boards = real[0][::2]  # 120 base puzzles
  rs = np.random.RandomState(2)
  family, rows = [], []
  for f, b in enumerate(boards):
    ci, dm = sudoku.draw_shuffles(rs, 2)
    for v in [b, *sudoku.apply_shuffles(b, ci, dm)]:
      family.append(f)
      rows.append(v)
  order = rs.permutation(len(rows))
  lines = sudoku.board_strings(np.asarray(rows)[order])
  family = np.asarray(family)[order]
  lst = tmp_path / "families.txt"
  lst.write_text("# three equivalent versions of each puzzle\n" + "\n".join(lines) + "\n")
  sudoku.build_from_lists(tmp_path / "ds", [lst], test_fraction=0.3, seed=0)
  by_string = {s: f for s, f in zip(lines, family)}
  side = {}
  for split in ("train", "test"):
    _, inputs, _ = read_all(tmp_path / "ds" / split)
    for s in sudoku.board_strings(inputs - 1):
      side.setdefault(by_string[s], set()).add(split)
  assert len(side) == len(boards)
  assert all(len(v) == 1 for v in side.values())  # no family straddles the split
  n_test = sum(v == {"test"} for v in side.values())
  assert 0.2 * len(boards) <= n_test <= 0.4 * len(boards)
  # And random symmetries of train puzzles never hit a test key.
  _, train_in, _ = read_all(tmp_path / "ds" / "train")
  _, test_in, _ = read_all(tmp_path / "ds" / "test")
  test_keys = set(sudoku.symmetry_invariant_keys(test_in - 1).tolist())
  for b in train_in[:50] - 1:
    ci, dm = sudoku.draw_shuffles(rs, 4)
    variants = sudoku.apply_shuffles(b, ci, dm)
    assert not test_keys & set(sudoku.symmetry_invariant_keys(variants).tolist())


# ---------------------------------------------------------------------------
# Builders and the written format.


def check_dataset(root, n_train, n_test, num_aug):
  """Metadata, index and example checks shared by the builders; returns the splits' arrays."""
  assert json.loads((root / "identifiers.json").read_text()) == ["<blank>"]
  out = {}
  for split, n, k in (("train", n_train, num_aug), ("test", n_test, 0)):
    info, inputs, labels = read_all(root / split)
    m = info.metadata
    assert (m.seq_len, m.vocab_size, m.pad_id) == (81, 11, 0)
    assert (m.ignore_label_id, m.blank_identifier_id) == (0, 0)
    assert m.num_puzzle_identifiers == 1 and m.sets == ["all"]
    assert m.total_groups == n and m.total_puzzles == n * (1 + k) and m.mean_puzzle_examples == 1.0
    idx = info.sets["all"]
    np.testing.assert_array_equal(idx.puzzle_indices, np.arange(n * (1 + k) + 1))
    np.testing.assert_array_equal(idx.group_indices, np.arange(n + 1) * (1 + k))
    assert (idx.puzzle_identifiers == 0).all()
    assert inputs.shape == (n * (1 + k), 81)
    assert inputs.min() >= 1 and inputs.max() <= 10 and labels.min() >= 2 and labels.max() <= 10
    q, a = inputs - 1, labels - 1
    assert sudoku_solver.is_valid_solution(a).all()
    assert sudoku_solver.consistent_with_givens(q, a).all()
    out[split] = (q, a)
  return out


def test_build_from_lists(real, data_dir, tmp_path):
  # A small list in the real format, plus bad puzzles that must be skipped and counted.
  boards, solutions, _, _, _ = real
  good = sudoku.board_strings(boards[:40])
  multi = boards[0].copy()
  multi[np.flatnonzero(multi)[0]] = 0  # 16 clues
  unsolvable = boards[50].copy()  # a given repeated in its row
  first = int(np.flatnonzero(unsolvable)[0])
  row = first // 9
  free = [c for c in range(9 * row, 9 * row + 9) if unsolvable[c] == 0][0]
  unsolvable[free] = unsolvable[first]
  lines = ["# comment", ""] + good[:20] + sudoku.board_strings(multi[None]) + good[20:] + \
      sudoku.board_strings(unsolvable[None]) + [good[3]]
  lst = tmp_path / "list.txt"
  lst.write_bytes(("\r\n".join(lines) + "\r\n").encode())
  warnings = []
  q, a, ratings, sources, counts = sudoku.solve_lists([lst], warn=warnings.append)
  assert counts == {"read": 43, "no_solution": 1, "multiple_solutions": 1, "duplicate": 1,
                    "below_min_difficulty": 0, "kept": 40}
  assert any(f"{lst}:23: puzzle has multiple solutions" in w for w in warnings)
  assert any(f"{lst}:44: puzzle has no solution" in w for w in warnings)
  assert sources == ["list"] * 40 and (ratings >= 0).all()
  _, _, _, _, counts_hard = sudoku.solve_lists([lst], min_difficulty=5, warn=lambda _: None)
  assert counts_hard["below_min_difficulty"] == int((ratings < 5).sum())

  out = tmp_path / "ds"
  sudoku.build_from_lists(out, [lst], num_test=10, num_aug=3, subsample_size=25, seed=1,
                          write_csv_dir=tmp_path / "csv")
  got = check_dataset(out, 25, 10, 3)
  originals = {s: i for i, s in enumerate(sudoku.board_strings(boards[:40]))}
  train_q = sudoku.board_strings(got["train"][0])
  for g in range(25):  # each group starts with an original puzzle and its solution
    i = originals[train_q[4 * g]]
    np.testing.assert_array_equal(got["train"][1][4 * g], solutions[i])
  # The CSVs hold the whole split and read back with the csv builder.
  q_csv, a_csv, _ = sudoku.read_sudoku_csv(tmp_path / "csv" / "train.csv")
  assert len(q_csv) == 30
  assert set(sudoku.board_strings(got["train"][0][::4])) <= set(sudoku.board_strings(q_csv))
  with pytest.raises(FileExistsError):
    sudoku.build_from_lists(out, [lst], num_test=10)


def test_build_generated_is_deterministic(tmp_path):
  sudoku.build_generated(tmp_path / "a", num_train=12, num_test=6, num_aug=2, seed=5)
  sudoku.build_generated(tmp_path / "b", num_train=12, num_test=6, num_aug=2, seed=5)
  got = check_dataset(tmp_path / "a", 12, 6, 2)
  for split in ("train", "test"):
    _, inp_a, lab_a = read_all(tmp_path / "a" / split)
    _, inp_b, lab_b = read_all(tmp_path / "b" / split)
    np.testing.assert_array_equal(inp_a, inp_b)
    np.testing.assert_array_equal(lab_a, lab_b)
  # Originals have unique solutions; no train original shares a symmetry key with test.
  originals = got["train"][0][::3]
  assert (sudoku_solver.solve_batch(originals)[1] == 1).all()
  assert not (set(sudoku.symmetry_invariant_keys(originals).tolist())
              & set(sudoku.symmetry_invariant_keys(got["test"][0]).tolist()))
  sudoku.build_generated(tmp_path / "hard", num_train=4, num_test=2, seed=0, min_difficulty=3)
  _, inp, _ = read_all(tmp_path / "hard" / "train")
  assert (sudoku_solver.solve_batch(inp - 1)[2] >= 3).all()


def write_csv(path, rows, header=True):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    if header:
      w.writerow(sudoku.CSV_HEADER)
    w.writerows(rows)


def test_build_from_csv(real, tmp_path):
  boards, solutions, _, _, _ = real
  q_str = sudoku.board_strings(boards[:30])
  q_str = [s.replace(".", "0") if i % 2 else s for i, s in enumerate(q_str)]  # both blank styles
  a_str = sudoku.board_strings(solutions[:30])
  ratings = np.arange(30) % 4
  rows = [["src", q, a, r] for q, a, r in zip(q_str, a_str, ratings)]
  write_csv(tmp_path / "train.csv", rows[:20])
  write_csv(tmp_path / "test.csv", rows[20:])
  sudoku.build_from_csv(tmp_path / "ds", tmp_path / "train.csv", tmp_path / "test.csv",
                        subsample_size=8, num_aug=2, seed=7)
  got = check_dataset(tmp_path / "ds", 8, 10, 2)
  pick = np.random.RandomState(7).choice(20, size=8, replace=False)
  np.testing.assert_array_equal(got["train"][0][::3], boards[pick])
  np.testing.assert_array_equal(got["train"][1][::3], solutions[pick])
  np.testing.assert_array_equal(got["test"][0], boards[20:30])
  # min_difficulty filters both files by the rating column.
  sudoku.build_from_csv(tmp_path / "hard", tmp_path / "train.csv", tmp_path / "test.csv",
                        min_difficulty=2)
  got = check_dataset(tmp_path / "hard", 10, int((ratings[20:] >= 2).sum()), 0)
  np.testing.assert_array_equal(got["test"][0], boards[20:30][ratings[20:30] >= 2])


@pytest.mark.parametrize("row, message", [
    (["s", "1" * 80, None, "0"], "question has 80 characters, expected 81"),
    (["s", "x" + "." * 80, None, "0"], "question has illegal character(s) 'x'"),
    (["s", None, "." * 81, "0"], "answer has illegal character(s) '.'"),
    (["s", None, "5" * 81, "0"], "answer is not a valid sudoku grid"),
    (["s", None, "WRONGGIVEN", "0"], "answer disagrees with the question's givens"),
    (["s", None, None, "hard"], "rating 'hard' is not an integer"),
    (["s", None, None], "3 columns, expected 4"),
])
def test_csv_bad_rows(real, tmp_path, row, message):
  boards, solutions, _, _, _ = real
  q, a = sudoku.board_strings(boards[:1])[0], sudoku.board_strings(solutions[:1])[0]
  row = list(row)
  if row[1] is None:
    row[1] = q
  if len(row) > 2 and row[2] is None:
    row[2] = a
  if len(row) > 2 and row[2] == "WRONGGIVEN":
    relabelled = solutions[0] % 9 + 1  # still a valid grid
    row[2] = sudoku.board_strings(relabelled[None])[0]
  path = tmp_path / "bad.csv"
  write_csv(path, [["s", q, a, "1"], row])
  with pytest.raises(sudoku.InputError) as e:
    sudoku.read_sudoku_csv(path)
  assert f"{path}:3: {message}" in str(e.value)


def test_bad_list_lines_and_missing_header(real, tmp_path):
  good = sudoku.board_strings(real[0][:2])
  path = tmp_path / "l.txt"
  path.write_text(f"{good[0]}\n# c\n{good[1][:-1]}\n")
  with pytest.raises(sudoku.InputError, match=f"{path}:3: puzzle has 80 characters, expected 81"):
    sudoku.read_puzzle_list(path)
  path.write_text(f"{good[0]}\n{good[1][:-1]}?\n")
  with pytest.raises(sudoku.InputError, match=rf"{path}:2: puzzle has illegal character\(s\) '\?'"):
    sudoku.read_puzzle_list(path)
  headless = tmp_path / "h.csv"
  write_csv(headless, [["s", good[0], sudoku.board_strings(real[1][:1])[0], "0"]], header=False)
  with pytest.raises(sudoku.InputError, match="expected the header line"):
    sudoku.read_sudoku_csv(headless)


def test_cli(real, tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    sudoku.main(["lists", "--help"])
  assert e.value.code == 0
  assert sudoku.main(["csv", "--output-dir", str(tmp_path / "x")]) == 1
  assert "csv mode needs --input-dir" in capsys.readouterr().err
  assert sudoku.main(["csv", "--input-dir", str(tmp_path),
                      "--output-dir", str(tmp_path / "x")]) == 1
  err = capsys.readouterr().err.strip()
  assert err == f"error: {tmp_path / 'train.csv'}: no such file"
  lst = tmp_path / "p.txt"
  lst.write_text("\n".join(sudoku.board_strings(real[0][:30])) + "\n")
  out = tmp_path / "cli_ds"
  assert sudoku.main(["lists", str(lst), "--num-test", "5", "--output-dir", str(out)]) == 0
  assert common.load_split(out / "test").metadata.total_groups == 5
  assert sudoku.main(["lists", str(lst), "--num-test", "5", "--output-dir", str(out)]) == 1
  assert "already exists" in capsys.readouterr().err
  assert sudoku.main(["lists", str(lst), "--num-test", "30", "--output-dir", str(out),
                      "--overwrite"]) == 1
  assert "--num-test 30 leaves no train puzzles" in capsys.readouterr().err
  assert sudoku.main(["generate", "--num-train", "3", "--num-test", "2", "--num-aug", "-1",
                      "--output-dir", str(tmp_path / "g")]) == 1
  assert "--num-aug must be a non-negative integer" in capsys.readouterr().err
  assert not (tmp_path / "g").exists()
