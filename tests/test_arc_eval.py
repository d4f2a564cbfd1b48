"""Tests of the ARC evaluator (trm_jax.tasks.arc_eval) on a small real build."""
import json

import numpy as np
import pytest

from data_prep import arc
from data_prep import common
from trm_jax.tasks import arc_eval
from trm_jax.tasks import dihedral


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, data_dir):
  out = tmp_path_factory.mktemp("arc_eval") / "ds"
  arc.build_arc_dataset([arc.SubsetFiles.from_prefix(str(data_dir / "arc" / "arc-agi"), "evaluation")],
                        "evaluation", out, num_aug=4, limit_puzzles=6, verbose=False)
  info = common.load_split(out / "test")
  reader = common.ExampleReader(info, "all")
  inputs, labels = reader[np.arange(len(reader))]
  reader.close()
  s = info.sets["all"]
  ids = np.repeat(s.puzzle_identifiers, np.diff(s.puzzle_indices))
  return out, ids, inputs, labels


def _augmented_canvas(name: str, grid) -> np.ndarray:
  """``grid`` (original colours and orientation) as version ``name`` shows it, as 900 tokens."""
  _, tid, mapping = arc.parse_aug_name(name)
  grid = np.asarray(grid, np.uint8)
  if mapping is not None:
    grid = dihedral.dihedral_transform(mapping[grid], tid)
  return arc.grid_canvas(grid).ravel()


def _crop_reference(canvas):
  """The SPEC §9 crop, written as the scan it describes."""
  grid = np.asarray(canvas).reshape(30, 30)
  best, best_size, num_c = 0, (0, 0), 30
  for num_r in range(1, 31):
    for c in range(num_c):
      if not 2 <= grid[num_r - 1, c] <= 11:
        num_c = c
        break
    if num_r * num_c > best:
      best, best_size = num_r * num_c, (num_r, num_c)
  return grid[:best_size[0], :best_size[1]] - 2


def test_crop_matches_the_scan():
  rng = np.random.default_rng(0)
  canvases = [arc.grid_canvas(rng.integers(0, 10, (r, c)).astype(np.uint8)).ravel()
              for r, c in ((1, 1), (30, 30), (5, 30), (30, 5), (3, 7))]
  for _ in range(300):  # ragged colour blocks, holes, and noise
    x = np.zeros((30, 30), np.uint8)
    widths = np.minimum.accumulate(rng.integers(0, 31, 30)) if rng.random() < 0.5 else rng.integers(0, 31, 30)
    for r, w in enumerate(widths[:rng.integers(0, 31)]):
      x[r, :w] = rng.integers(2, 12, w)
    if rng.random() < 0.3:
      x[rng.integers(0, 30), rng.integers(0, 30)] = rng.integers(0, 2)
    canvases.append(x.ravel())
  canvases.append(np.zeros(900, np.uint8))
  batch = np.stack(canvases)
  rows, cols = arc_eval.crop_sizes(batch)
  for b, canvas in enumerate(canvases):
    expected = _crop_reference(canvas)
    got = arc_eval.crop(canvas)
    assert got.dtype == np.uint8 and np.array_equal(got, expected), b
    assert (rows[b], cols[b]) == expected.shape


def test_inverse_aug_undoes_every_version():
  rng = np.random.default_rng(1)
  grid = rng.integers(0, 10, (4, 7)).astype(np.uint8)
  for tid in range(8):
    mapping = np.concatenate([[0], rng.permutation(np.arange(1, 10))]).astype(np.uint8)
    name = arc.aug_name("p", tid, mapping)
    orig, undo = arc_eval.inverse_aug(name)
    assert orig == "p"
    assert np.array_equal(undo(dihedral.dihedral_transform(mapping[grid], tid)), grid)
  assert arc_eval.inverse_aug("p")[0] == "p"


def _evaluate(ds_dir, ids, inputs, preds, q, **kwargs):
  ev = arc_eval.ARCEvaluator(ds_dir, **kwargs)
  ev.update(ids, inputs, preds, q)
  return ev


def test_true_labels_score_one(dataset, tmp_path):
  ds_dir, ids, inputs, labels = dataset
  q = np.random.default_rng(0).normal(size=ids.shape).astype(np.float32)
  ev = _evaluate(ds_dir, ids, inputs, labels, q)
  result = ev.result(tmp_path)
  assert result == {f"ARC/pass@{k}": 1.0 for k in (1, 2, 5, 10, 100, 1000)}
  submission = json.loads((tmp_path / "submission.json").read_text())
  test_puzzles = json.loads((ds_dir / "test_puzzles.json").read_text())
  assert list(submission) == list(test_puzzles)
  for name, attempts in submission.items():
    assert len(attempts) == len(test_puzzles[name]["test"])
    for a, pair in zip(attempts, test_puzzles[name]["test"]):
      assert set(a) == {"attempt_1", "attempt_2"}
      for grid in a.values():
        assert isinstance(grid, list) and all(isinstance(row, list) for row in grid)
        assert all(isinstance(v, int) and 0 <= v <= 9 for row in grid for v in row)
      assert a["attempt_1"] == pair["output"] == a["attempt_2"]  # one candidate: repeated


def test_votes_decide_and_corruption_lowers_the_score(dataset):
  ds_dir, ids, inputs, labels = dataset
  names = json.loads((ds_dir / "identifiers.json").read_text())
  test_puzzles = json.loads((ds_dir / "test_puzzles.json").read_text())
  preds = labels.copy()
  q = np.zeros(ids.shape, np.float32)
  # Puzzle A: every version predicts the same wrong grid -> 0 for A at every K.
  # Puzzle B: a majority (3 of 5) predicts one wrong grid -> B fails pass@1, passes pass@2.
  a_name, b_name = list(test_puzzles)[:2]
  for name, majority in ((a_name, 5), (b_name, 3)):
    for i, pair in enumerate(test_puzzles[name]["test"]):
      wrong = np.array(pair["output"], np.uint8)
      wrong[0, 0] = (wrong[0, 0] + 1) % 10
      rows = [r for r in range(len(ids)) if names[ids[r]].split("|||")[0] == name
              and np.array_equal(arc_eval.inverse_aug(names[ids[r]])[1](arc_eval.crop(inputs[r])),
                                 np.array(pair["input"], np.uint8))]
      assert len(rows) == 5
      for r in rows[:majority]:
        preds[r] = _augmented_canvas(names[ids[r]], wrong)
  result = _evaluate(ds_dir, ids, inputs, preds, q).result()
  n = len(test_puzzles)
  assert result["ARC/pass@1"] == pytest.approx((n - 2) / n)
  assert result["ARC/pass@2"] == pytest.approx((n - 1) / n)
  assert result["ARC/pass@1000"] == pytest.approx((n - 1) / n)


def test_ranking_by_count_then_mean_q(dataset, tmp_path):
  ds_dir, _, _, _ = dataset
  names = json.loads((ds_dir / "identifiers.json").read_text())
  test_puzzles = json.loads((ds_dir / "test_puzzles.json").read_text())
  name = next(n for n in test_puzzles if len(test_puzzles[n]["test"]) == 1)
  ident = names.index(name)
  pair = test_puzzles[name]["test"][0]
  inp = arc.grid_canvas(np.array(pair["input"], np.uint8)).ravel()
  grids = {k: np.full((2, 3), v, np.uint8) for k, v in (("A", 1), ("B", 2), ("C", 3), ("D", 4))}
  # A: 3 votes, low q; B: 2 votes, high q; C: 2 votes, lower q; D: 1 vote, highest q.
  rows = [("A", -3.0), ("A", -2.0), ("A", -4.0), ("B", 2.0), ("B", 1.0), ("C", 0.0), ("C", 0.5), ("D", 9.0)]
  ids = np.full(len(rows), ident)
  inputs = np.stack([inp] * len(rows))
  preds = np.stack([arc.grid_canvas(grids[g]).ravel() for g, _ in rows])
  q = np.array([v for _, v in rows], np.float32)
  ev = _evaluate(ds_dir, ids, inputs, preds, q, pass_ks=(1, 2, 3, 4))
  ranked = ev.ranked(name, np.array(pair["input"], np.uint8))
  by_hash = {arc_eval.grid_hash(g): k for k, g in grids.items()}
  assert [by_hash[h] for h, _, _ in ranked] == ["A", "B", "C", "D"]
  assert [c for _, c, _ in ranked] == [3, 2, 2, 1]
  assert ranked[1][2] == pytest.approx((arc_eval.sigmoid64(2.0) + arc_eval.sigmoid64(1.0)) / 2, abs=1e-15)
  ev.result(tmp_path)
  attempts = json.loads((tmp_path / "submission.json").read_text())[name][0]
  assert attempts == {"attempt_1": grids["A"].tolist(), "attempt_2": grids["B"].tolist()}
  # Exact ties in (count, mean q) are ordered by the grid's hash.
  ev2 = _evaluate(ds_dir, ids[:2], inputs[:2], np.stack([preds[0], preds[3]]), np.zeros(2, np.float32))
  tied = ev2.ranked(name, np.array(pair["input"], np.uint8))
  assert [h for h, _, _ in tied] == sorted(h for h, _, _ in tied)


def test_padding_rows_are_skipped_and_missing_predictions_get_placeholders(dataset, tmp_path):
  ds_dir, ids, inputs, labels = dataset
  q = np.zeros(ids.shape, np.float32)
  rng = np.random.default_rng(0)
  pad = 7
  ids_p = np.concatenate([ids, np.zeros(pad, ids.dtype)])
  junk = rng.integers(0, 12, (pad, 900)).astype(np.uint8)
  full = _evaluate(ds_dir, ids_p, np.concatenate([inputs, junk]), np.concatenate([labels, junk]),
                   np.concatenate([q, np.full(pad, 50.0, np.float32)]))
  assert full.num_predictions == len(ids)
  assert full.result()["ARC/pass@1"] == 1.0
  # Drop every prediction of the first test puzzle.
  names = json.loads((ds_dir / "identifiers.json").read_text())
  first = next(iter(json.loads((ds_dir / "test_puzzles.json").read_text())))
  keep = np.array([names[i].split("|||")[0] != first for i in ids])
  ev = _evaluate(ds_dir, ids[keep], inputs[keep], labels[keep], q[keep])
  n = len(json.loads((ds_dir / "test_puzzles.json").read_text()))
  assert ev.result(tmp_path)["ARC/pass@2"] == pytest.approx((n - 1) / n)
  first_attempts = json.loads((tmp_path / "submission.json").read_text())[first]
  assert first_attempts and all(a == {"attempt_1": [[0]], "attempt_2": [[0]]} for a in first_attempts)


def test_merged_hosts_equal_one_host(dataset, tmp_path):
  ds_dir, ids, inputs, labels = dataset
  rng = np.random.default_rng(3)
  # Noisy predictions so that the ranking has something to decide, and coarse q for exact ties.
  preds = labels.copy()
  flip = rng.random(len(ids)) < 0.4
  preds[flip, 0] = 2 + (preds[flip, 0] - 1) % 10
  q = np.round(rng.normal(size=ids.shape), 1).astype(np.float32)
  single = _evaluate(ds_dir, ids, inputs, preds, q)
  expected = single.result(tmp_path / "single")
  host = rng.integers(0, 3, len(ids))
  evaluators = [_evaluate(ds_dir, ids[host == h], inputs[host == h], preds[host == h], q[host == h])
                for h in range(3)]
  states = [json.loads(json.dumps(ev.state())) for ev in evaluators[1:]]
  evaluators[0].merge(states)
  assert evaluators[0].result(tmp_path / "merged") == expected
  assert ((tmp_path / "merged" / "submission.json").read_bytes() ==
          (tmp_path / "single" / "submission.json").read_bytes())
  assert 0 < expected["ARC/pass@1"] < 1


def test_aggregated_voting_keeps_or_clears(dataset):
  ds_dir, ids, inputs, labels = dataset
  q = np.zeros(ids.shape, np.float32)
  for aggregated, expected in ((True, 2), (False, 1)):
    ev = arc_eval.ARCEvaluator(ds_dir, aggregated_voting=aggregated)
    for _ in range(2):
      ev.begin_eval()
      ev.update(ids, inputs, labels, q)
    assert ev.num_predictions == expected * len(ids)


def test_prediction_dataset_without_solutions(tmp_path, data_dir):
  prefix = data_dir / "arc" / "arc-agi"
  out = tmp_path / "pred"
  assert arc.main(["--challenges-file", f"{prefix}_evaluation2_challenges.json", "--output-dir", str(out),
                   "--num-aug", "1", "--limit-puzzles", "3", "--quiet"]) == 0
  info = common.load_split(out / "test")
  reader = common.ExampleReader(info, "all")
  inputs, _ = reader[np.arange(len(reader))]
  reader.close()
  s = info.sets["all"]
  ids = np.repeat(s.puzzle_identifiers, np.diff(s.puzzle_indices))
  ev = _evaluate(out, ids, inputs, inputs, np.zeros(ids.shape, np.float32))
  assert ev.result(tmp_path) == {}
  submission = json.loads((tmp_path / "submission.json").read_text())
  test_puzzles = json.loads((out / "test_puzzles.json").read_text())
  assert [len(v) for v in submission.values()] == [len(p["test"]) for p in test_puzzles.values()]
  first = next(iter(test_puzzles))
  assert submission[first][0]["attempt_1"] == test_puzzles[first]["test"][0]["input"]


def test_bad_identifier_and_missing_files(dataset, tmp_path):
  ds_dir, ids, inputs, labels = dataset
  ev = arc_eval.ARCEvaluator(ds_dir)
  with pytest.raises(ValueError, match="identifier 99999999 outside identifiers.json"):
    ev.update(np.array([99999999]), inputs[:1], labels[:1], np.zeros(1))
  with pytest.raises(FileNotFoundError, match="identifiers.json: missing"):
    arc_eval.ARCEvaluator(tmp_path)
