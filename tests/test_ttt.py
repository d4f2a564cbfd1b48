"""Test-time training in --mode=predict: a tiny ARC run predicts puzzles it never saw."""

import json
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

import shared_paths
from data_prep import common
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import errors
from trm_jax import inference
from trm_jax import state as state_lib
from trm_jax import train
from trm_jax import ttt
from test_train import ARC_EVALUATORS
from test_train import tiny_config

ARC = shared_paths.DATA_DIR / "arc"
KNOWN, NEW = 3, 2  # the run trains on the first 3 evaluation puzzles; predict adds 2 it never saw


def test_extend_puzzle_table_keeps_rows_and_adds_the_mean_of_the_trained_ones():
  table = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 6.0], [0.0, 0.0]], np.float32)  # blank, 2 trained, padding
  for t in (table, jnp.asarray(table)):
    out = np.asarray(state_lib.extend_puzzle_table(t, 6, trained_rows=3))
    assert out.shape == (6, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:3], table[:3])
    np.testing.assert_array_equal(out[3:], [[2.0, 4.0]] * 3)  # neither the blank row nor the padding counted
  np.testing.assert_array_equal(state_lib.extend_puzzle_table(table[:1], 2), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="rows=2"):
    state_lib.extend_puzzle_table(table, 2, trained_rows=3)


def test_settings_are_checked_and_split_into_phases():
  config = tiny_config("unused")
  config.ttt.mode = "everything"
  with pytest.raises(errors.UserError, match=r"config\.ttt\.mode='everything': expected one of"):
    ttt.settings(config)
  config.ttt.mode = "embeddings_then_all"
  config.ttt.steps, config.ttt.switch_fraction = 10, 0.3
  assert ttt.phases(ttt.settings(config)) == [(0, 3, True), (3, 10, False)]
  assert ttt.settings(config).batch_size == config.global_batch_size  # 0: the run's
  config.ttt.switch_fraction = 1.0
  assert ttt.phases(ttt.settings(config)) == [(0, 10, True)]
  config.ttt.mode, config.ttt.steps = "all", 0
  assert ttt.phases(ttt.settings(config)) == []
  config.ttt.steps = -1
  with pytest.raises(errors.UserError, match=r"config\.ttt\.steps=-1"):
    ttt.settings(config)


@pytest.fixture(scope="module")
def arc_run(tmp_path_factory):
  from trm_jax import datasets  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("arc")
  datasets.build("arc", root / "data", dict(subsets=["evaluation"], test_set_name="evaluation", num_aug=1,
                                            limit_puzzles=KNOWN, verbose=False,
                                            input_file_prefix=str(ARC / "arc-agi")))
  config = tiny_config(root / "data", global_batch_size=8, epochs=2, eval_interval=2, evaluators=ARC_EVALUATORS,
                       best_metric="ARC/pass@2", tensorboard=False,
                       **{"model.mlp_t": False, "model.pos_encodings": "rope", "model.puzzle_emb_len": 2})
  train.train_and_evaluate(config, root / "run")
  # Challenges: the run's puzzles, then some it never saw; their solutions beside them.
  with common.open_input(ARC / "arc-agi_evaluation_challenges.json") as f:
    challenges = json.load(f)
  with common.open_input(ARC / "arc-agi_evaluation_solutions.json") as f:
    solutions = json.load(f)
  names = list(challenges)[:KNOWN + NEW]
  (root / "x_challenges.json").write_text(json.dumps({n: challenges[n] for n in names}))
  (root / "x_solutions.json").write_text(json.dumps({n: solutions[n] for n in names}))
  return root, config, {n: challenges[n] for n in names}


def ttt_config(config, **ttt_settings):
  config = config.copy_and_resolve_references()
  config.ttt.update(dict(steps=4, mode="all", num_aug=1, batch_size=8,
                         lr=3e-3, warmup_steps=0, time_budget_s=0.0))
  config.ttt.update(ttt_settings)
  config.log_every_steps = 2
  return config


def run_dir_snapshot(workdir):
  return sorted((str(p.relative_to(workdir)), p.stat().st_mtime_ns, p.stat().st_size)
                for p in workdir.rglob("*") if p.is_file())


def check_submission(path, challenges):
  submission = json.loads(path.read_text())
  assert list(submission) == list(challenges)
  for name, puzzle in challenges.items():
    assert len(submission[name]) == len(puzzle["test"])
    for attempts in submission[name]:
      assert set(attempts) == {"attempt_1", "attempt_2"}
      for grid in attempts.values():
        assert grid and all(isinstance(row, list) and row and len(row) == len(grid[0]) for row in grid)
        assert len(grid) <= 30 and len(grid[0]) <= 30
        assert all(isinstance(v, int) and 0 <= v <= 9 for row in grid for v in row)
  return submission


@pytest.fixture(scope="module")
def blank_prediction(arc_run, tmp_path_factory):
  """steps=0: today's predict (the new puzzles get the blank embedding)."""
  root, config, _ = arc_run
  out = tmp_path_factory.mktemp("blank") / "submission.json"
  summary = inference.predict(ttt_config(config, steps=0), root / "run", root / "x_challenges.json", out)
  return summary, out


def test_steps_zero_is_predict_without_training(arc_run, blank_prediction):
  root, _, challenges = arc_run
  summary, out = blank_prediction
  assert "ttt" not in summary and summary["unknown_puzzles"] == NEW
  # Every version the run has of a known puzzle, and each new test input once.
  with open(root / "data" / "identifiers.json") as f:
    versions = len(json.load(f)) - 1
  tests = [len(p["test"]) for p in challenges.values()]
  assert summary["predictions"] == versions // KNOWN * sum(tests[:KNOWN]) + sum(tests[KNOWN:])
  check_submission(out, challenges)


def test_ttt_learns_the_new_puzzles_demonstrations(arc_run, blank_prediction, tmp_path, monkeypatch, capsys):
  root, config, challenges = arc_run
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
  (tmp_path / "tmp").mkdir()
  before = run_dir_snapshot(root / "run")
  out = tmp_path / "submission.json"
  summary = inference.predict(ttt_config(config), root / "run", root / "x_challenges.json", out)
  report = summary["ttt"]
  assert report["puzzles"] == NEW and report["steps"] == 4 and report["stopped_by"] is None
  demo_before, demo_after = report["demonstrations_before"], report["demonstrations_after"]
  assert demo_before["count"] == demo_after["count"] == sum(len(challenges[n]["train"]) for n in list(challenges)[KNOWN:])
  # Seen: lm_loss 2.71 -> 1.60, cell accuracy 0.04 -> 0.67.
  assert demo_after["lm_loss"] < demo_before["lm_loss"] - 0.3
  assert demo_after["accuracy"] > demo_before["accuracy"] + 0.2
  # Every version of every test input is voted on: 2 versions (num_aug=1) of each new puzzle.
  assert summary["unknown_puzzles"] == NEW and "ARC/pass@2" in summary
  submission = check_submission(out, challenges)
  # The puzzles the run knows skip the training: their answers are those of plain predict.
  blank = json.loads(blank_prediction[1].read_text())
  for name in list(challenges)[:KNOWN]:
    assert submission[name] == blank[name]
  printed = capsys.readouterr().out
  assert "test-time training: 2 new puzzle(s)" in printed and "step 4/4" in printed and "steps/s, ETA" in printed
  assert run_dir_snapshot(root / "run") == before  # the run directory is left as it was
  assert not list((tmp_path / "tmp").iterdir())  # the temporary dataset is gone


@pytest.mark.parametrize("mode", ["embeddings", "embeddings_then_all"])
def test_ttt_modes_other_than_all(arc_run, blank_prediction, tmp_path, mode):
  """The new rows alone (the network fixed, as freeze_weights), or those first and then everything."""
  root, config, challenges = arc_run
  out = tmp_path / "submission.json"
  summary = inference.predict(ttt_config(config, mode=mode, switch_fraction=0.5, puzzle_emb_lr=0.1),
                              root / "run", root / "x_challenges.json", out)
  report = summary["ttt"]
  assert report["steps"] == 4 and report["stopped_by"] is None
  assert report["mode"] == mode
  # Seen: embeddings 2.715 -> 2.699 in 4 steps (the rows alone move slowly), embeddings_then_all -> 1.86.
  fall = {"embeddings": 0.005, "embeddings_then_all": 0.3}[mode]
  assert report["demonstrations_after"]["lm_loss"] < report["demonstrations_before"]["lm_loss"] - fall
  submission = check_submission(out, challenges)
  # In every mode the puzzles the run knows keep its network and rows, so their answers are plain predict's.
  blank = json.loads(blank_prediction[1].read_text())
  for name in list(challenges)[:KNOWN]:
    assert submission[name] == blank[name]


def test_time_budget_stops_training_to_vote(arc_run, tmp_path):
  root, config, challenges = arc_run
  out = tmp_path / "submission.json"
  summary = inference.predict(ttt_config(config, time_budget_s=1.0), root / "run", root / "x_challenges.json", out)
  assert summary["ttt"]["steps"] == 0 and summary["ttt"]["stopped_by"] == "time_budget"
  check_submission(out, challenges)


@pytest.mark.parametrize("content, message", [
    ("not json", "invalid JSON"),
    ('["a list"]', "expected a non-empty JSON object"),
    ('{"p": {"train": [{"input": [[1, 2], [3]], "output": [[1]]}], "test": [{"input": [[0]]}]}}',
     r"puzzle p: train\[0\]\.input: grid is not rectangular"),
    ('{"p": {"train": [{"input": [[1, 12]], "output": [[1]]}], "test": [{"input": [[0]]}]}}',
     r"puzzle p: train\[0\]\.input: colour 12 outside 0\.\.9"),
    ('{"p": {"train": [{"input": [[1]], "output": [[1]]}], "test": [{"input": ' + json.dumps([[0] * 31] * 31)
     + "}]}}", r"puzzle p: test\[0\]\.input: grid is 31x31, larger than 30x30"),
    ('{"p": {"train": [{"input": [[1]]}], "test": [{"input": [[0]]}]}}', r"train\[0\] has no 'output'"),
])
def test_bad_challenges_are_one_line_errors_that_change_nothing(arc_run, tmp_path, content, message):
  root, config, _ = arc_run
  bad = tmp_path / "bad_challenges.json"
  bad.write_text(content)
  before = run_dir_snapshot(root / "run")
  with pytest.raises(errors.UserError, match=message) as info:
    inference.predict(ttt_config(config), root / "run", bad, tmp_path / "out.json")
  assert str(info.value).startswith(str(bad)) and "\n" not in str(info.value)
  assert run_dir_snapshot(root / "run") == before and not (tmp_path / "out.json").exists()


def test_missing_input_and_another_architecture(arc_run, tmp_path):
  root, config, _ = arc_run
  with pytest.raises(errors.UserError, match="absent_challenges.json: challenges file not found"):
    inference.predict(ttt_config(config), root / "run", tmp_path / "absent_challenges.json")
  other = ttt_config(config)
  other.model.hidden_size = 64
  before = run_dir_snapshot(root / "run")
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match=r"model\.hidden_size: checkpoint 32, config 64"):
    inference.predict(other, root / "run", root / "x_challenges.json", tmp_path / "out.json")
  assert run_dir_snapshot(root / "run") == before and not (tmp_path / "out.json").exists()
