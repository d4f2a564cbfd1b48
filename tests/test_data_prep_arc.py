"""Tests of the ARC builder (data_prep.arc) on the real ARC files, at small sizes."""
import json
import pathlib

import numpy as np
import pytest

from data_prep import arc
from data_prep import common
from trm_jax.tasks import dihedral

LIMIT = 4
NUM_AUG = 3
SUBSETS = ("training", "evaluation", "concept")  # "training" lists "test" before "train"
TEST_SET = "evaluation"


def _build(prefix, out, *extra):
  argv = ["--input-file-prefix", str(prefix), "--output-dir", str(out), "--quiet", *extra]
  return arc.main(argv)


def _read_split(root: pathlib.Path, split: str):
  info = common.load_split(root / split)
  s = info.sets["all"]
  reader = common.ExampleReader(info, "all")
  inputs, labels = reader[np.arange(len(reader))]
  reader.close()
  return info, s, inputs, labels


def _offset(canvas_S: np.ndarray) -> tuple[int, int]:
  grid = canvas_S.reshape(30, 30)
  rows, cols = np.nonzero(grid)
  return int(rows.min()), int(cols.min())


def _grid_at(canvas_S: np.ndarray, offset) -> np.ndarray:
  """The grid of a canvas whose top-left cell is at ``offset``."""
  grid = canvas_S.reshape(30, 30)[offset[0]:, offset[1]:]
  is_colour = grid >= 2
  rows = int(np.argmin(is_colour[:, 0])) if not is_colour[:, 0].all() else grid.shape[0]
  cols = int(np.argmin(is_colour[0])) if not is_colour[0].all() else grid.shape[1]
  out = grid[:rows, :cols]
  assert (out >= 2).all(), "grid is not a full rectangle of colours"
  return out - 2


def _undo(name: str, grid: np.ndarray) -> tuple[str, np.ndarray]:
  orig, tid, mapping = arc.parse_aug_name(name)
  if mapping is None:
    return orig, grid
  return orig, np.argsort(mapping).astype(np.uint8)[dihedral.inverse_dihedral_transform(grid, tid)]


@pytest.fixture(scope="module")
def arc_prefix(data_dir):
  return data_dir / "arc" / "arc-agi"


@pytest.fixture(scope="module")
def originals(arc_prefix):
  """(subset, puzzle id) -> {'train': [(in, out)], 'test': [(in, out)]} of the first LIMIT puzzles."""
  result = {}
  for subset in SUBSETS:
    with common.open_input(f"{arc_prefix}_{subset}_challenges.json") as f:
      ch = json.load(f)
    with common.open_input(f"{arc_prefix}_{subset}_solutions.json") as f:
      so = json.load(f)
    for pid in list(ch)[:LIMIT]:
      result[pid] = {
          "subset": subset,
          "train": [(np.array(e["input"]), np.array(e["output"])) for e in ch[pid]["train"]],
          "test": [(np.array(e["input"]), np.array(so[pid][i])) for i, e in enumerate(ch[pid]["test"])],
      }
  return result


@pytest.fixture(scope="module")
def built(tmp_path_factory, arc_prefix):
  out = tmp_path_factory.mktemp("arc") / "ds"
  assert _build(arc_prefix, out, "--subsets", *SUBSETS, "--test-set-name", TEST_SET,
                "--num-aug", str(NUM_AUG), "--limit-puzzles", str(LIMIT)) == 0
  return out


def test_every_example_inverts_to_an_original_pair(built, originals):
  names = json.loads((built / "identifiers.json").read_text())
  for split in ("train", "test"):
    _, s, inputs, labels = _read_split(built, split)
    for p in range(s.num_puzzles):
      orig_name = None
      for e in range(s.puzzle_indices[p], s.puzzle_indices[p + 1]):
        offset = _offset(inputs[e])
        assert _offset(labels[e]) == offset, "input and output must share the translation"
        orig_name, inp = _undo(names[s.puzzle_identifiers[p]], _grid_at(inputs[e], offset))
        _, out = _undo(names[s.puzzle_identifiers[p]], _grid_at(labels[e], offset))
        puzzle = originals[orig_name]
        if split == "test":
          allowed = puzzle["test"]
        elif puzzle["subset"] == TEST_SET:
          allowed = puzzle["train"]
        else:
          allowed = puzzle["train"] + puzzle["test"]
        assert any(np.array_equal(inp, a) and np.array_equal(out, b) for a, b in allowed), (split, orig_name)
      # All examples of the puzzle are present, once each.
      n = s.puzzle_indices[p + 1] - s.puzzle_indices[p]
      puzzle = originals[orig_name]
      expected = (len(puzzle["test"]) if split == "test" else
                  len(puzzle["train"]) + (0 if puzzle["subset"] == TEST_SET else len(puzzle["test"])))
      assert n == expected


def test_translation_only_in_train_one_example_kept_at_origin(built):
  _, s, inputs, _ = _read_split(built, "train")
  moved = 0
  for p in range(s.num_puzzles):
    offsets = [_offset(inputs[e]) for e in range(s.puzzle_indices[p], s.puzzle_indices[p + 1])]
    assert (0, 0) in offsets
    moved += sum(o != (0, 0) for o in offsets)
  assert moved > 0.5 * (len(inputs) - s.num_puzzles)
  _, _, test_inputs, test_labels = _read_split(built, "test")
  assert all(_offset(x) == (0, 0) for x in test_inputs)
  assert all(_offset(x) == (0, 0) for x in test_labels)


def test_identifiers_groups_and_metadata_agree(built, originals):
  names = json.loads((built / "identifiers.json").read_text())
  assert names[0] == "<blank>" and len(set(names)) == len(names)
  train_info, train, _, _ = _read_split(built, "train")
  test_info, test, _, _ = _read_split(built, "test")
  for info, s in ((train_info, train), (test_info, test)):
    m = info.metadata
    assert (m.seq_len, m.vocab_size, m.pad_id, m.ignore_label_id, m.blank_identifier_id) == (900, 12, 0, 0, 0)
    assert m.num_puzzle_identifiers == len(names)
    assert m.total_puzzles == s.num_puzzles and m.total_groups == s.num_groups
    assert m.mean_puzzle_examples == pytest.approx(s.num_examples / s.num_puzzles)
  # Train: every puzzle of every subset is a group of the original + NUM_AUG versions with their own ids.
  assert train.num_groups == len(originals)
  assert sorted(train.puzzle_identifiers.tolist()) == list(range(1, len(names)))
  for g in range(train.num_groups):
    ids = train.puzzle_identifiers[train.group_indices[g]:train.group_indices[g + 1]]
    group_names = [names[i] for i in ids]
    assert len(group_names) == NUM_AUG + 1
    assert arc.PUZZLE_ID_SEPARATOR not in group_names[0]
    assert all(n.startswith(group_names[0] + arc.PUZZLE_ID_SEPARATOR) for n in group_names[1:])
  # Test: the test-set puzzles, with the same identifiers as their train pairs.
  test_groups = {names[test.puzzle_identifiers[test.group_indices[g]]] for g in range(test.num_groups)}
  assert test_groups == {pid for pid, p in originals.items() if p["subset"] == TEST_SET}
  assert set(test.puzzle_identifiers.tolist()) <= set(train.puzzle_identifiers.tolist())
  test_puzzles = json.loads((built / "test_puzzles.json").read_text())
  assert set(test_puzzles) == test_groups
  for pid, puzzle in test_puzzles.items():
    for pair, (_, out) in zip(puzzle["test"], originals[pid]["test"]):
      assert np.array_equal(np.array(pair["output"]), out)


def test_same_flags_give_identical_bytes(tmp_path, arc_prefix):
  flags = ("--subsets", "training", "evaluation", "--test-set-name", "evaluation", "--num-aug", "2",
           "--limit-puzzles", "2")
  for name in ("a", "b"):
    assert _build(arc_prefix, tmp_path / name, *flags) == 0
  assert _build(arc_prefix, tmp_path / "c", *flags, "--seed", "7") == 0
  files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
  assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
  for f in files:
    assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
  assert (tmp_path / "a" / "identifiers.json").read_bytes() != (tmp_path / "c" / "identifiers.json").read_bytes()


def test_random_draws_equal_numpy_random_state():
  words = arc._RandomWords(123)
  ref = np.random.RandomState(123)
  items = list(range(57))
  expected = list(items)
  ref.shuffle(expected)
  assert words.shuffle(items) == expected
  tids = np.empty(300, np.int64)
  maps = np.empty((300, 10), np.uint8)
  ends = np.empty(300, np.int64)
  words.ensure(300 * 40)
  assert arc._trials_kernel(words.words, words.pos, tids, maps, ends) == 300
  words.pos = int(ends[-1])
  for t in range(300):
    assert tids[t] == ref.randint(0, 8)
    assert np.array_equal(maps[t, 1:], ref.permutation(np.arange(1, 10, dtype=np.uint8)))
  for high in (1, 2, 3, 7, 8, 9, 17, 30, 31):
    words.ensure(64)
    value, words.pos = arc._bounded(words.words, words.pos, high - 1)
    assert value == ref.randint(0, high)
  # The stream continues where RandomState is.
  words.ensure(64)
  value, _ = arc._bounded(words.words, words.pos, 999)
  assert value == ref.randint(0, 1000)


def test_translation_draws_follow_the_original_rule():
  """group_tokens against a direct rendering with RandomState draws, as the original makes them."""
  rng = np.random.default_rng(0)
  pairs = [(rng.integers(0, 10, (r1, c1)).astype(np.uint8), rng.integers(0, 10, (r2, c2)).astype(np.uint8))
           for r1, c1, r2, c2 in ((3, 4, 5, 2), (30, 1, 2, 30), (7, 7, 7, 7), (1, 1, 30, 30))]
  tids = np.array([0, 1, 6, 7, 3])
  maps = np.stack([np.concatenate([[0], rng.permutation(np.arange(1, 10))]) for _ in tids]).astype(np.uint8)
  got = arc.group_tokens(pairs, tids, maps, arc._RandomWords(5))
  ref = np.random.RandomState(5)
  for v, (tid, m) in enumerate(zip(tids, maps)):
    keep = ref.randint(0, len(pairs))
    for e, (inp, out) in enumerate(pairs):
      ti, to = (dihedral.dihedral_transform(m[g], tid) for g in (inp, out))
      pr = pc = 0
      if e != keep:
        pr = ref.randint(0, 30 - max(ti.shape[0], to.shape[0]) + 1)
        pc = ref.randint(0, 30 - max(ti.shape[1], to.shape[1]) + 1)
      for k, g in enumerate((ti, to)):
        expected = np.zeros((30, 30), np.uint8)
        expected[pr:pr + g.shape[0], pc:pc + g.shape[1]] = g + 2
        if pr + g.shape[0] < 30:
          expected[pr + g.shape[0], pc:pc + g.shape[1]] = 1
        if pc + g.shape[1] < 30:
          expected[pr:pr + g.shape[0], pc + g.shape[1]] = 1
        assert np.array_equal(got[v, e, k], expected.ravel()), (v, e, k)


def test_name_round_trip():
  m = np.array([0, 3, 1, 2, 9, 8, 7, 6, 5, 4], np.uint8)
  name = arc.aug_name("abc|x", 6, m)
  assert name == "abc|x|||t6|||0312987654"
  orig, tid, mapping = arc.parse_aug_name(name)
  assert orig == "abc|x" and tid == 6 and np.array_equal(mapping, m)
  assert arc.parse_aug_name("abc")[2] is None
  with pytest.raises(ValueError, match="not a permutation"):
    arc.parse_aug_name("abc|||t1|||0012345678")


# ---------------------------------------------------------------------------
# Bad input.


@pytest.fixture()
def small_prefix(tmp_path, arc_prefix):
  """Two puzzles per subset copied into tmp_path (returns the prefix and a file editor)."""
  prefix = tmp_path / "in" / "arc-agi"
  prefix.parent.mkdir()
  for subset in ("training", "evaluation"):
    for kind in ("challenges", "solutions"):
      with common.open_input(f"{arc_prefix}_{subset}_{kind}.json") as f:
        d = json.load(f)
      keep = list(d)[:2]
      (prefix.parent / f"arc-agi_{subset}_{kind}.json").write_text(json.dumps({k: d[k] for k in keep}))
  return prefix


def _edit(prefix, subset, kind, fn):
  path = prefix.parent / f"arc-agi_{subset}_{kind}.json"
  d = json.loads(path.read_text())
  fn(d)
  path.write_text(json.dumps(d))
  return path, list(d)[0]


def _fails(prefix, tmp_path, capsys, *expected, extra=()):
  out = tmp_path / "out"
  rc = _build(prefix, out, "--subsets", "training", "evaluation", "--test-set-name", "evaluation",
              "--num-aug", "1", *extra)
  err = capsys.readouterr().err
  assert rc == 1, err
  line = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(line) == 1, err
  for e in expected:
    assert str(e) in line[0], (e, line[0])
  assert not out.exists() and not list(out.parent.glob(".out.building-*"))
  return line[0]


def test_invalid_json(small_prefix, tmp_path, capsys):
  path = small_prefix.parent / "arc-agi_training_challenges.json"
  path.write_text(path.read_text()[:-10])
  _fails(small_prefix, tmp_path, capsys, path, "invalid JSON")


def test_non_rectangular_grid(small_prefix, tmp_path, capsys):
  def fn(d):
    d[list(d)[0]]["train"][1]["input"][0].append(0)
  path, pid = _edit(small_prefix, "training", "challenges", fn)
  _fails(small_prefix, tmp_path, capsys, path, pid, "train[1].input", "not rectangular")


def test_colour_out_of_range(small_prefix, tmp_path, capsys):
  def fn(d):
    d[list(d)[0]]["train"][0]["output"][0][0] = 10
  path, pid = _edit(small_prefix, "evaluation", "challenges", fn)
  _fails(small_prefix, tmp_path, capsys, path, pid, "train[0].output", "colour 10 outside 0..9")


def test_grid_too_large(small_prefix, tmp_path, capsys):
  def fn(d):
    d[list(d)[0]]["test"][0]["input"] = [[1] * 31] * 2
  path, pid = _edit(small_prefix, "training", "challenges", fn)
  _fails(small_prefix, tmp_path, capsys, path, pid, "test[0].input", "2x31", "larger than 30x30")


def test_bad_solution_grid(small_prefix, tmp_path, capsys):
  def fn(d):
    d[list(d)[1]][0] = [[1, 2], [3]]
  path, _ = _edit(small_prefix, "evaluation", "solutions", fn)
  pid = list(json.loads(path.read_text()))[1]
  _fails(small_prefix, tmp_path, capsys, path, pid, "solution 0", "not rectangular")


def test_solutions_with_wrong_number_of_grids(small_prefix, tmp_path, capsys):
  def fn(d):
    d[list(d)[0]].append([[0]])
  path, pid = _edit(small_prefix, "evaluation", "solutions", fn)
  _fails(small_prefix, tmp_path, capsys, path, pid, "expected 1 output grid(s)", "got 2")


def test_solutions_missing_a_puzzle(small_prefix, tmp_path, capsys):
  removed = []

  def fn(d):
    removed.append(list(d)[0])
    del d[removed[0]]
  path, _ = _edit(small_prefix, "training", "solutions", fn)
  _fails(small_prefix, tmp_path, capsys, path, removed[0], "no solutions")


def test_missing_test_set_solutions_is_an_error(small_prefix, tmp_path, capsys):
  path = small_prefix.parent / "arc-agi_evaluation_solutions.json"
  path.unlink()
  _fails(small_prefix, tmp_path, capsys, path, "test set 'evaluation'", "--allow-missing-test-solutions")


def test_missing_solutions_of_other_subset_is_a_warning(small_prefix, tmp_path, capsys):
  path = small_prefix.parent / "arc-agi_training_solutions.json"
  path.unlink()
  assert _build(small_prefix, tmp_path / "out", "--subsets", "training", "evaluation", "--test-set-name",
                "evaluation", "--num-aug", "1") == 0
  err = capsys.readouterr().err
  assert f"warning: {path}: not found" in err and "1 x missing solutions file" in err
  common.load_split(tmp_path / "out" / "train")


def test_unknown_subset_and_missing_challenges(small_prefix, tmp_path, capsys):
  line = _fails(small_prefix, tmp_path, capsys, "unknown subset 'nope'", "arc-agi_nope_challenges.json",
                "evaluation, training", extra=("--subsets", "training", "nope"))
  assert "error:" in line
  with pytest.raises(arc.ArcDataError, match="arc-agi_gone_challenges.json: challenges .* not found"):
    arc.build_arc_dataset([arc.SubsetFiles.from_prefix(str(small_prefix), "evaluation"),
                           arc.SubsetFiles.from_prefix(str(small_prefix), "gone")],
                          "evaluation", tmp_path / "out", num_aug=1, verbose=False)
  assert not (tmp_path / "out").exists()


def test_test_set_must_be_a_subset(small_prefix, tmp_path, capsys):
  _fails(small_prefix, tmp_path, capsys, "test set 'training2' is not one of the subsets",
         extra=("--test-set-name", "training2"))


def test_existing_output_needs_overwrite(small_prefix, tmp_path, capsys):
  (tmp_path / "out").mkdir()
  rc = _build(small_prefix, tmp_path / "out", "--subsets", "evaluation", "--test-set-name", "evaluation")
  assert rc == 1 and "--overwrite" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_loadable(small_prefix, tmp_path, monkeypatch):
  calls = []
  real = common.SetWriter.add_puzzle

  def failing(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return real(self, *args, **kwargs)
  monkeypatch.setattr(common.SetWriter, "add_puzzle", failing)
  with pytest.raises(KeyboardInterrupt):
    _build(small_prefix, tmp_path / "out", "--subsets", "training", "evaluation", "--test-set-name",
           "evaluation", "--num-aug", "2")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_prediction_build_without_solutions(small_prefix, tmp_path):
  challenges = small_prefix.parent / "arc-agi_evaluation_challenges.json"
  out = tmp_path / "pred"
  assert arc.main(["--challenges-file", str(challenges), "--output-dir", str(out), "--num-aug", "2",
                   "--quiet"]) == 0
  test_puzzles = json.loads((out / "test_puzzles.json").read_text())
  assert list(test_puzzles) and all("output" not in pair for p in test_puzzles.values() for pair in p["test"])
  info = common.load_split(out / "test")
  assert info.metadata.total_groups == len(test_puzzles)
  assert common.load_split(out / "train").metadata.total_groups == len(test_puzzles)
  # The Kaggle-style flags do the same.
  (small_prefix.parent / "arc-agi_evaluation_solutions.json").unlink()
  assert _build(small_prefix, tmp_path / "pred2", "--subsets", "evaluation", "--test-set-name", "evaluation",
                "--num-aug", "2", "--allow-missing-test-solutions") == 0
  for f in ("identifiers.json", "test_puzzles.json"):
    assert (out / f).read_text() == (tmp_path / "pred2" / f).read_text()


def test_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as e:
    arc.main(["--help"])
  assert e.value.code == 0 and "--num-aug" in capsys.readouterr().out
