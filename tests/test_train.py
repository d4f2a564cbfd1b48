"""The trainer end to end: configs, training, resume, signals, eval, predict, TensorBoard."""

import json
import os
import re
import signal
import struct
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import shared_paths
from data_prep import common
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import errors
from trm_jax import inference
from trm_jax import runs
from trm_jax import tasks
from trm_jax import train

REPO = shared_paths.REPO_ROOT
CONFIGS = [("configs/default.py", None), ("configs/arc.py", "arc1"), ("configs/arc.py", "arc2"),
           ("configs/sudoku.py", "mlp"), ("configs/sudoku.py", "att"), ("configs/maze.py", None),
           ("configs/quickstart.py", "sudoku"), ("configs/quickstart.py", "maze")]


def load_config(path, arg=None):
  import importlib  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
  return module.get_config(arg)


@pytest.mark.parametrize("path, arg", CONFIGS)
def test_configs_load_and_are_locked(path, arg):
  config = load_config(path, arg)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.lr_typo = 1.0
  with pytest.raises(AttributeError):
    config.model.hiden_size = 3
  metadata = common.DatasetMetadata(seq_len=81, vocab_size=11, pad_id=0, ignore_label_id=0, blank_identifier_id=0,
                                    num_puzzle_identifiers=3, total_groups=10, mean_puzzle_examples=1.0,
                                    total_puzzles=10, sets=["all"])
  model = runs.model_config(config, metadata)
  assert model.puzzle_emb_ndim == model.hidden_size  # tied by a reference in default.py
  assert config.epochs % config.eval_interval == 0


def test_paper_settings():
  arc = load_config("configs/arc.py")
  assert (arc.model.L_cycles, arc.model.H_cycles, arc.lr, arc.puzzle_emb_lr, arc.weight_decay, arc.ema) == (
      4, 3, 1e-4, 1e-2, 0.1, True)
  sudoku = load_config("configs/sudoku.py")
  assert (sudoku.model.mlp_t, sudoku.model.pos_encodings, sudoku.model.L_cycles, sudoku.weight_decay,
          sudoku.epochs, sudoku.eval_interval) == (True, "none", 6, 1.0, 50000, 5000)
  with pytest.raises(ValueError, match="variant"):
    load_config("configs/sudoku.py", "transformer")


# ---------------------------------------------------------------------------
# Tiny runs on a generated sudoku dataset.


@pytest.fixture(scope="module")
def sudoku_data(tmp_path_factory):
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("data") / "sudoku"
  sudoku.build_generated(path, num_train=24, num_test=20, num_aug=3, seed=0, target_clues=50)
  return path


ARC_EVALUATORS = ml_collections.ConfigDict({"arc": tasks.evaluator_config("arc")})


def tiny_config(data_path, **overrides):
  config = load_config("configs/quickstart.py")
  with config.unlocked():
    config.data_path = str(data_path)
    config.data_build = ""
  config.global_batch_size = 16
  config.epochs = 4
  config.eval_interval = 2
  config.lr_warmup_steps = 2
  config.log_every_steps = 2
  config.model.hidden_size = 32
  config.model.num_heads = 2
  config.model.L_layers = 1
  config.model.H_cycles = 2
  config.model.L_cycles = 1
  config.model.halt_max_steps = 2
  config.num_image_samples = 2
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def final_params(workdir):
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restored = ckpt.latest.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  ckpt.close()
  return step, restored.state


def assert_same_run(reference_dir, reference_summary, workdir, summary):
  """Two runs ended at the same step with bit-identical states and the same final evaluation.

  Returns the (shared) final state.
  """
  step_a, state_a = final_params(reference_dir)
  step_b, state_b = final_params(workdir)
  assert step_a == step_b
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  assert summary["last_eval"] == reference_summary["last_eval"]
  return state_a


@pytest.fixture(scope="module")
def full_run(sudoku_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  summary = train.train_and_evaluate(tiny_config(sudoku_data), workdir)
  return workdir, summary


def test_trains_end_to_end(full_run, sudoku_data):
  from trm_jax import data  # pylint: disable=g-import-not-at-top
  workdir, summary = full_run
  config = tiny_config(sudoku_data)
  # The run ends after epochs / eval_interval passes, whose exact lengths the data plan knows.
  with data.make_train_iterator(sudoku_data, global_batch_size=config.global_batch_size, seed=config.seed,
                                epochs_per_iter=config.eval_interval) as plan:
    passes = config.epochs // config.eval_interval
    assert summary["end_step"] == sum(plan.batches_in_pass(p) for p in range(passes))
  assert summary["last_eval"]["all/count"] == 20  # every test puzzle counted
  evals = sorted((workdir / "eval").iterdir())
  assert len(evals) == 2  # one evaluation per pass of eval_interval epochs
  results = json.loads((evals[-1] / "results.json").read_text())
  assert results == pytest.approx(summary["last_eval"])
  assert (workdir / "best").is_dir() and (workdir / "checkpoints").is_dir()


def test_rerunning_a_finished_run_says_it_is_complete(full_run, sudoku_data, capsys):
  workdir, summary = full_run
  capsys.readouterr()
  again = train.train_and_evaluate(tiny_config(sudoku_data), workdir)
  out = capsys.readouterr().out
  assert again["start_step"] == again["end_step"] == summary["end_step"]
  assert f"already complete (step {summary['end_step']})" in out
  assert f"best checkpoint: step {summary['best_step']}" in out and f"run directory: {workdir}" in out
  assert "step 1/" not in out and "trm-jax:" not in out  # no banner, no training


def read_events(path):
  """(tag, kind) of every summary value in a TensorBoard event file."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  seen = []
  data = path.read_bytes()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    record = data[pos + 12:pos + 12 + length]
    pos += 12 + length + 4
    event = event_pb2.Event.FromString(record)
    for value in event.summary.value:
      seen.append((value.tag, value.WhichOneof("value")))
  return seen


def test_tensorboard_scalars_and_images(full_run):
  workdir, _ = full_run
  files = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert len(files) == 1
  seen = read_events(files[0])
  tags = {tag for tag, _ in seen}
  for tag in ("train/lm_loss", "train/q_halt_loss", "train/accuracy", "train/exact_accuracy",
              "train/q_halt_accuracy", "train/steps", "train/lr", "train/puzzle_emb_lr",
              "train/steps_per_second", "eval/all/accuracy", "eval/all/exact_accuracy"):
    assert tag in tags, tag
  assert ("eval/predictions", "image") in seen


def test_resume_is_bit_identical(full_run, sudoku_data, tmp_path):
  reference_dir, summary = full_run
  # Stop in the middle of the second pass, then run the same command again.
  first = train.train_and_evaluate(tiny_config(sudoku_data, max_steps=summary["end_step"] - 3), tmp_path)
  assert first["end_step"] == summary["end_step"] - 3
  second = train.train_and_evaluate(tiny_config(sudoku_data), tmp_path)
  assert second["start_step"] == first["end_step"]
  assert second["end_step"] == summary["end_step"]
  assert_same_run(reference_dir, summary, tmp_path, second)


def test_eval_mode_on_saved_checkpoint(full_run, sudoku_data):
  workdir, summary = full_run
  results = inference.evaluate_checkpoint(tiny_config(sudoku_data), workdir, checkpoint="latest")
  assert results == pytest.approx(summary["last_eval"])
  assert (workdir / "eval" / f"ckpt_{summary['end_step']}" / "results.json").is_file()
  with pytest.raises(errors.UserError, match="no checkpoint at step 12345"):
    inference.evaluate_checkpoint(tiny_config(sudoku_data), workdir, checkpoint="12345")


def test_incompatible_checkpoint_is_refused(full_run, sudoku_data):
  workdir, _ = full_run
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="model.hidden_size"):
    train.train_and_evaluate(tiny_config(sudoku_data, **{"model.hidden_size": 64}), workdir)


def test_latest_and_best_managers_never_share_barrier_names(tmp_path):
  """Both save the same step; with one barrier name per step their multi-process commits collided.

  (The two-process run in test_sharding.py hung about once in 12 runs under load
  before; this pins the cause. Reads orbax's private attribute, present in
  every supported orbax version.)
  """
  ckpt = checkpoint_lib.Checkpointer(tmp_path, async_save=True)
  try:
    prefixes = [m._multiprocessing_options.barrier_sync_key_prefix for m in (ckpt.latest, ckpt.best)]  # pylint: disable=protected-access
  finally:
    ckpt.close()
  assert all(prefixes) and prefixes[0] != prefixes[1], prefixes


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(sudoku_data, tmp_path):
  # An absurd learning rate: the first update makes the weights overflow.
  config = tiny_config(sudoku_data, lr=1e36, lr_warmup_steps=1000, checkpoint_every_steps=1)
  with pytest.raises(errors.NonFiniteLossError, match=r"at step (\d+)") as info:
    train.train_and_evaluate(config, tmp_path)
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  latest = checkpoint_lib.Checkpointer(tmp_path, async_save=False).latest_step()
  assert latest is not None and latest < bad_step
  assert f"the latest checkpoint (step {latest}) is the last good state" in str(info.value)
  assert isinstance(info.value, errors.UserError)  # launch.py: one line, exit status 2
  # Before any checkpoint (the message used to say "the latest checkpoint (None)").
  config.checkpoint_every_steps = 0
  with pytest.raises(errors.NonFiniteLossError, match="no checkpoint was saved before it"):
    train.train_and_evaluate(config, tmp_path / "none")


@pytest.mark.parametrize("overrides, message", [
    ({"eval_interval": 3}, "eval_interval=3 does not divide epochs=4"),
    ({"global_batch_size": 10**6}, "global_batch_size"),
    ({"global_batch_size": 96, "epochs": 400, "eval_interval": 1}, "larger than one pass"),
    ({"mesh.data": 3}, "mesh"),
    ({"model.num_heads": 64}, "num_heads=64 is larger than hidden_size=32"),
    ({"model.arch": "hrn"}, r"config\.model\.arch='hrn': expected one of \('trm', 'trm_singlez', 'trm_hier6', 'hrm', "
                            r"'transformers_baseline'\)"),
    ({"evaluators": ml_collections.ConfigDict({"sudoku": {"type": "sudoku"}})},
     r"config\.evaluators\.sudoku\.type='sudoku': expected one of \('arc', 'maze'\)"),
    ({"evaluators": ml_collections.ConfigDict({"arc": {"pass_k": [1]}})},
     r"config\.evaluators\.arc: unknown key\(s\) \['pass_k'\]; a 'arc' evaluator takes "
     r"\['aggregated_voting', 'pass_ks', 'submission_k'\]"),
    ({"evaluators": ml_collections.ConfigDict({"arc": {"type": "arc"}})},
     r"config\.evaluators\.arc \('arc'\): .*test_puzzles\.json: missing"),
])
def test_bad_config_errors(sudoku_data, tmp_path, overrides, message):
  with pytest.raises(errors.UserError, match=message):
    train.train_and_evaluate(tiny_config(sudoku_data, **overrides), tmp_path)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_missing_and_malformed_dataset(tmp_path, sudoku_data):
  with pytest.raises(errors.UserError, match="does not exist"):
    runs.setup(tiny_config(tmp_path / "nowhere"), tmp_path / "run")
  broken = tmp_path / "broken"
  (broken / "train").mkdir(parents=True)
  (broken / "train" / "dataset.json").write_text("{not json")
  with pytest.raises(errors.UserError, match="invalid JSON"):
    runs.setup(tiny_config(broken), tmp_path / "run")


@pytest.fixture(scope="module")
def second_sudoku(tmp_path_factory):
  """Another Sudoku set with as many puzzles as sudoku_data (directories that train together must agree)."""
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("data") / "sudoku2"
  sudoku.build_generated(path, num_train=24, num_test=20, num_aug=3, seed=1, target_clues=50)
  return path


def test_several_data_paths_train_as_one(sudoku_data, second_sudoku, tmp_path):
  """The original's data_paths: a pass covers each directory's sets; every test set is evaluated."""
  from trm_jax import data  # pylint: disable=g-import-not-at-top
  config = tiny_config(f"{sudoku_data}, {second_sudoku}", epochs=2)
  summary = train.train_and_evaluate(config, tmp_path / "run")
  with data.make_train_iterator([sudoku_data, second_sudoku], global_batch_size=config.global_batch_size,
                                seed=config.seed, epochs_per_iter=config.eval_interval) as plan:
    assert summary["end_step"] == plan.batches_in_pass(0)
    assert plan.metadata.sets == ["all", "all1"]
  assert summary["last_eval"]["all/count"] == 20 and summary["last_eval"]["all1/count"] == 20
  # The second directory's test split alone, from that run's checkpoint.
  results = inference.evaluate_checkpoint(tiny_config(f"{sudoku_data},{second_sudoku}", epochs=2,
                                                      test_data_path=str(second_sudoku)), tmp_path / "run")
  assert results["all/count"] == 20 and "all1/count" not in results
  assert results["all/lm_loss"] == pytest.approx(summary["last_eval"]["all1/lm_loss"], rel=1e-5)


def test_continue_a_run_on_another_dataset(full_run, sudoku_data, second_sudoku, tmp_path):
  """README's flow (the original's load_checkpoint + freeze_weights): export, then init_weights elsewhere."""
  workdir, _ = full_run
  exported = inference.export_weights(tiny_config(sudoku_data), workdir, tmp_path / "weights.npz")
  config = tiny_config(second_sudoku, epochs=2, init_weights=str(exported), freeze_weights=True)
  summary = train.train_and_evaluate(config, tmp_path / "b")
  assert summary["start_step"] == 0 and summary["end_step"] > 0
  _, before = final_params(workdir)
  _, after = final_params(tmp_path / "b")
  # The network is the exported one (the EMA copy: the quickstart keeps one), unchanged; only the
  # new dataset's puzzle table trained.
  jax.tree.map(np.testing.assert_array_equal, after["params"], before["ema_params"])
  assert not np.array_equal(after["puzzle_emb"], before["puzzle_emb"])


@pytest.mark.parametrize("overrides,message", [
    ({"data_path": "{a},{b}", "evaluators": ml_collections.ConfigDict({"maze": {"type": "maze"}})},
     r"^evaluators \['maze'\] read one test dataset's files, but the test data has 2 directories"),
    ({"data_path": "{a},{missing}"}, r"^data_path '.*missing' does not exist"),
    ({"data_path": "{a},{missing}", "data_build": "sudoku"}, r"^data_build builds one directory, but data_path "
                                                              r"lists 2"),
    ({"test_data_path": "{missing}"}, r"^test_data_path '.*missing' does not exist"),
    ({"data_path": " , "}, r"^config\.data_path is empty"),
])
def test_data_path_list_errors(sudoku_data, second_sudoku, tmp_path, overrides, message):
  paths = {"a": sudoku_data, "b": second_sudoku, "missing": tmp_path / "missing"}
  overrides = {k: v.format(**paths) if isinstance(v, str) else v for k, v in overrides.items()}
  config = tiny_config(overrides.pop("data_path", sudoku_data), **overrides)
  with pytest.raises(errors.UserError, match=message):
    runs.setup(config, tmp_path / "run")


# ---------------------------------------------------------------------------
# The command line: launch.py in a subprocess.


def launch(args, cwd=REPO, **kw):
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_unknown_flag_key_fails_naming_it(tmp_path):
  proc = launch(["--config=configs/quickstart.py", "--config.lr_typo=1", f"--workdir={tmp_path}"])
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode != 0
  assert "lr_typo" in out


def test_sigterm_saves_a_checkpoint(sudoku_data, tmp_path):
  args = ["--config=configs/quickstart.py", f"--config.data_path={sudoku_data}", "--config.data_build=",
          "--config.global_batch_size=16", "--config.epochs=400", "--config.eval_interval=200",
          "--config.log_every_steps=1", "--config.model.hidden_size=32", "--config.model.num_heads=2",
          "--config.model.L_layers=1", "--config.model.H_cycles=2", "--config.model.L_cycles=1",
          "--config.model.halt_max_steps=2", f"--workdir={tmp_path}"]
  proc = launch(args)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  assert "stopped by SIGTERM" in out
  # Quiet by default: the progress lines only, no absl/Orbax INFO log lines.
  assert not [l for l in out.splitlines() if re.match(r"I\d{4} ", l)], out
  step = checkpoint_lib.Checkpointer(tmp_path, async_save=False).latest_step()
  assert step is not None and step >= 3
  # No temporary (half-written) checkpoint directories are left behind.
  assert all(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_user_error_is_one_line(tmp_path):
  # From another directory: the config path is found in the checkout.
  proc = launch(["--config=configs/quickstart.py", f"--config.data_path={tmp_path / 'absent'}",
                 "--config.data_build=", f"--workdir={tmp_path / 'run'}"], cwd=tmp_path)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 2
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "does not exist" in errors[0]
  assert "Traceback" not in out


# ---------------------------------------------------------------------------
# ARC: the evaluator inside training, and predict.


@pytest.fixture(scope="module")
def arc_run(tmp_path_factory):
  from trm_jax import datasets  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("arc")
  datasets.build("arc", root / "data", dict(subsets=["evaluation"], test_set_name="evaluation", num_aug=1,
                                            limit_puzzles=3, verbose=False,
                                            input_file_prefix=str(shared_paths.DATA_DIR / "arc" / "arc-agi")))
  config = tiny_config(root / "data", global_batch_size=8, epochs=2, eval_interval=2, evaluators=ARC_EVALUATORS,
                       best_metric="ARC/pass@2", **{"model.mlp_t": False, "model.pos_encodings": "rope",
                                                    "model.puzzle_emb_len": 2})
  summary = train.train_and_evaluate(config, root / "run")
  return root, config, summary


def test_arc_evaluation_in_training(arc_run):
  root, _, summary = arc_run
  assert {"ARC/pass@1", "ARC/pass@2", "ARC/pass@1000"} <= set(summary["last_eval"])
  submission = root / "run" / "eval" / f"step_{summary['end_step']}" / "submission.json"
  assert set(json.loads(submission.read_text())) == set(json.loads((root / "data" / "test_puzzles.json").read_text()))


def test_predict_writes_a_valid_submission(arc_run, tmp_path):
  root, config, _ = arc_run
  with common.open_input(shared_paths.DATA_DIR / "arc" / "arc-agi_evaluation_challenges.json") as f:
    challenges = json.load(f)
  with common.open_input(shared_paths.DATA_DIR / "arc" / "arc-agi_evaluation_solutions.json") as f:
    solutions = json.load(f)
  names = list(challenges)[:4]  # three the run trained on, one it never saw
  (tmp_path / "slice_challenges.json").write_text(json.dumps({n: challenges[n] for n in names}))
  (tmp_path / "slice_solutions.json").write_text(json.dumps({n: solutions[n] for n in names}))
  out = tmp_path / "submission.json"
  config = config.copy_and_resolve_references()
  config.ttt.steps = 0  # the new puzzle gets the blank embedding (tests/test_ttt.py trains it)
  summary = inference.predict(config, root / "run", tmp_path / "slice_challenges.json", out)
  assert summary["unknown_puzzles"] == 1 and summary["puzzles"] == 4
  assert "ARC/pass@2" in summary
  submission = json.loads(out.read_text())
  assert list(submission) == names
  for name in names:
    assert len(submission[name]) == len(challenges[name]["test"])
    for attempts in submission[name]:
      assert set(attempts) == {"attempt_1", "attempt_2"}
      for grid in attempts.values():
        assert grid and all(isinstance(row, list) and row for row in grid)
        assert all(isinstance(v, int) and 0 <= v <= 9 for row in grid for v in row)


def test_predict_rejects_bad_input(arc_run, tmp_path):
  root, config, _ = arc_run
  bad = tmp_path / "bad_challenges.json"
  bad.write_text('{"abc": {"train": [{"input": [[1, 12]], "output": [[1]]}], "test": [{"input": [[0]]}]}}')
  with pytest.raises(errors.UserError, match=r"abc.*colour 12"):
    inference.predict(config, root / "run", bad, tmp_path / "out.json")


def test_out_of_memory_is_a_user_error_with_advice(sudoku_data, tmp_path, monkeypatch):
  """A step that does not fit says which settings to change (no XLA traceback)."""
  from trm_jax import steps  # pylint: disable=g-import-not-at-top

  def make_train_step(*args, **kwargs):
    def failing(state, carry, batch):
      # Raised while tracing; an allocation failure surfaces from the same call.
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.5GiB")
    return failing
  monkeypatch.setattr(steps, "make_train_step", make_train_step)
  with pytest.raises(errors.UserError) as info:
    train.train_and_evaluate(tiny_config(sudoku_data), tmp_path)
  message = str(info.value)
  assert "out of device memory at global_batch_size=16" in message
  for advice in ("model.remat=network", "model.kernels=pallas", "--find_max_batch"):
    assert advice in message


def test_readme_notebook_block_runs(sudoku_data, tmp_path, monkeypatch):
  """The README's Python block, as written, on a tiny model and dataset."""
  from trm_jax.configs import quickstart  # pylint: disable=g-import-not-at-top
  readme = (shared_paths.REPO_ROOT / "README.md").read_text()
  match = re.search(r"```python\n(.*?)```", readme, re.S)
  assert match, "README.md has no ```python block"
  tiny = tiny_config(sudoku_data, eval_interval=20)
  monkeypatch.setattr(quickstart, "get_config", lambda arg=None: tiny)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(match.group(1), "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["summary"]["end_step"] > 0 and "all/exact_accuracy" in namespace["summary"]["last_eval"]
  assert namespace["solved"].shape == (8,)
  assert namespace["results"]["all/exact_accuracy"] == namespace["summary"]["best_metric"]  # the best checkpoint
  assert namespace["weights_npz"].is_file()


def test_notebook_runs(sudoku_data, tmp_path, monkeypatch):
  """notebooks/quickstart.ipynb, every code cell in order (shell and magic lines
  left out: they install and start TensorBoard), on a tiny model and dataset."""
  from trm_jax.configs import quickstart  # pylint: disable=g-import-not-at-top
  notebook = json.loads((shared_paths.REPO_ROOT / "notebooks" / "quickstart.ipynb").read_text())
  cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
  assert cells
  tiny = tiny_config(sudoku_data, eval_interval=2)
  monkeypatch.setattr(quickstart, "get_config", lambda arg=None: tiny)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  for i, source in enumerate(cells):
    python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    exec(compile(python, f"quickstart.ipynb[code cell {i}]", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["summary"]["end_step"] == namespace["summary"]["total_steps"]
  image = namespace["panel"]
  assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > image.shape[1] / 4
  assert namespace["results"]["all/exact_accuracy"] == namespace["summary"]["best_metric"]
  assert namespace["weights_npz"].is_file()
  assert (tmp_path / "runs" / "notebook" / "tensorboard").is_dir()
