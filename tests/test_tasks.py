"""Tests of the task seam (trm_jax.tasks): the registry, the task every builder records, the evaluators'
config, and that a run never imports data_prep."""
import ast
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import shared_paths
from data_prep import arc
from data_prep import common
from data_prep import convert
from data_prep import maze
from data_prep import sudoku
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import dataset_format
from trm_jax import errors
from trm_jax import monitor
from trm_jax import tasks

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One tiny dataset per builder."""
  root = tmp_path_factory.mktemp("tasks")
  sudoku.build_generated(root / "sudoku", num_train=4, num_test=2, target_clues=60)
  maze.build_generated(root / "maze", num_train=4, num_test=2, grid_size=6, min_path_length=4)
  arc.build_arc_dataset([arc.SubsetFiles.from_prefix(str(shared_paths.DATA_DIR / "arc" / "arc-agi"), "evaluation")],
                        "evaluation", root / "arc", num_aug=1, limit_puzzles=1, verbose=False)
  convert.export_original(root / "sudoku", root / "original")
  convert.import_original(root / "original", root / "imported")
  convert.import_original(root / "original", root / "imported_sudoku", task="sudoku")
  return root


@pytest.mark.parametrize("name, task", [("sudoku", "sudoku"), ("maze", "maze"), ("arc", "arc"),
                                        ("imported", "generic"), ("imported_sudoku", "sudoku")])
def test_every_builder_records_its_task(built, name, task):
  for split in ("train", "test"):
    raw = json.loads((built / name / split / dataset_format.METADATA_FILE).read_text())
    assert raw["trm_jax"]["task"] == task
    info = dataset_format.load_split(built / name / split)
    assert info.task == task
    assert tasks.of_dataset(info).name == task


def test_unknown_task_is_refused_by_the_writers(built, tmp_path):
  with pytest.raises(convert.ConvertError, match=r"--task='mazes': expected one of \('arc', 'sudoku', 'maze', "
                                                 r"'generic'\)"):
    convert.import_original(built / "original", tmp_path / "x", task="mazes")
  with common.DatasetWriter(tmp_path / "y") as ds:
    w = ds.set_writer("train", "all", 4, 3)
    w.add_puzzle(np.ones((1, 4), np.int64), np.ones((1, 4), np.int64), 0)
    w.end_group()
    with pytest.raises(errors.UserError, match=r"task 'mazes': expected one of"):
      ds.finish_split("train", task="mazes", num_puzzle_identifiers=1)
    ds.finish_split("train", task="generic", num_puzzle_identifiers=1)


def test_export_leaves_the_task_out(built):
  raw = json.loads((built / "original" / "train" / dataset_format.METADATA_FILE).read_text())
  assert "trm_jax" not in raw and "task" not in raw


def _without_task(split_dir: pathlib.Path, *, builder: str | None = None) -> dataset_format.SplitInfo:
  info = dataset_format.load_split(split_dir)
  return dataclasses.replace(info, task=None, builder=builder)


def test_dataset_without_task(built, capsys):
  """Before tasks were recorded: the generic task with one note per dataset, never a guess from shapes
  (this ARC-shaped split, 900 tokens and vocabulary 12, is not taken for ARC); an ARC build by its builder."""
  info = _without_task(built / "arc" / "train")
  assert tasks.of_dataset(info).name == "generic"
  assert tasks.of_dataset(info).name == "generic"
  err = capsys.readouterr().err
  assert err.count("note: ") == 1 and "records no task" in err and '"task"' in err
  assert tasks.of_dataset(_without_task(built / "arc" / "test", builder="data_prep.arc")).name == "arc"


def test_unknown_task_names_the_choices(built):
  info = dataclasses.replace(dataset_format.load_split(built / "maze" / "train"), task="mazes")
  with pytest.raises(errors.UserError, match=r"dataset\.json: trm_jax\.task='mazes': expected one of "
                                             r"\('arc', 'sudoku', 'maze', 'generic'\)"):
    tasks.of_dataset(info)
  with pytest.raises(errors.UserError, match=r"task 'mazes': expected one of \('arc', 'sudoku', 'maze', 'generic'\)"):
    tasks.get("mazes")
  meta_path = built / "maze" / "train" / dataset_format.METADATA_FILE
  raw = json.loads(meta_path.read_text())
  broken = built / "broken"
  broken.mkdir()
  for f in (built / "maze" / "train").iterdir():
    (broken / f.name).write_bytes(f.read_bytes())
  raw["trm_jax"]["task"] = 3
  (broken / dataset_format.METADATA_FILE).write_text(json.dumps(raw))
  with pytest.raises(dataset_format.DatasetFormatError, match=r"trm_jax\.task must be a task name"):
    dataset_format.load_split(broken)


@pytest.mark.parametrize("name", ["arc", "sudoku", "maze", "generic"])
def test_every_task_draws_a_panel(built, name):
  data = {"arc": "arc", "sudoku": "sudoku", "maze": "maze", "generic": "imported"}[name]
  info = dataset_format.load_split(built / data / "test")
  reader = dataset_format.ExampleReader(info, "all")
  inputs, labels = reader[[0, 1]]
  reader.close()
  labels = labels.astype(np.int64)
  preds = np.where(labels > 0, labels, 1)
  preds[:, 0] = (labels[:, 0] + 1) % info.metadata.vocab_size  # one wrong cell each
  panel = monitor.prediction_panel(inputs, preds, np.where(labels == 0, -100, labels), tasks.get(name).draw)
  assert panel.dtype == np.uint8 and panel.ndim == 3 and panel.shape[2] == 3 and panel.shape[0] > 20
  if name != "sudoku":  # a red corner on the wrong cell
    assert (panel.reshape(-1, 3) == [255, 0, 0]).all(axis=1).any()


def test_only_arc_predicts(built, tmp_path):
  assert {n for n, t in tasks.TASKS.items() if t.predictor} == {"arc"}
  from trm_jax.configs import quickstart  # pylint: disable=g-import-not-at-top
  from trm_jax import inference  # pylint: disable=g-import-not-at-top
  config = quickstart.get_config("maze")
  with config.unlocked():
    config.data_path = str(built / "maze")
    config.data_build = ""
  with pytest.raises(errors.UserError, match=r"^--mode=predict: .*maze holds the 'maze' task, which has no "
                                             r"prediction mode \(tasks with one: \('arc',\)\)$"):
    inference.predict(config, tmp_path / "run", tmp_path / "challenges.json")


# ---------------------------------------------------------------------------
# Evaluators, configured one by one.


def test_evaluator_settings_fill_defaults_and_take_the_name_as_type():
  config = ml_collections.ConfigDict({"arc": {"pass_ks": (1, 2)}, "paths": {"type": "maze"},
                                      "votes": tasks.evaluator_config("arc", submission_k=3)})
  got = {name: (kind.name, settings) for name, kind, settings in tasks.evaluator_settings(config)}
  assert got == {"arc": ("arc", {"pass_ks": (1, 2), "submission_k": 2, "aggregated_voting": True}),
                 "paths": ("maze", {}),
                 "votes": ("arc", {"pass_ks": (1, 2, 5, 10, 100, 1000), "submission_k": 3,
                                   "aggregated_voting": True})}
  assert tasks.evaluator_settings(ml_collections.ConfigDict()) == []


@pytest.mark.parametrize("evaluators, message", [
    ("arc,maze", r"config\.evaluators='arc,maze': expected a ConfigDict of named entries"),
    ({"arc": 1}, r"config\.evaluators\.arc=1: expected an entry"),
    ({"x": {"type": "sudoku"}}, r"config\.evaluators\.x\.type='sudoku': expected one of \('arc', 'maze'\)"),
    ({"sudoku": {}}, r"config\.evaluators\.sudoku\.type='sudoku': expected one of \('arc', 'maze'\)"),
    ({"maze": {"grid": 3}}, r"config\.evaluators\.maze: unknown key\(s\) \['grid'\]; a 'maze' evaluator takes "
                            r"no key besides 'type'"),
])
def test_evaluator_config_errors(evaluators, message):
  with pytest.raises(errors.UserError, match=message):
    tasks.evaluator_settings(evaluators)


def test_evaluator_config_of_unknown_type():
  with pytest.raises(errors.UserError, match=r"evaluator type 'sudoku': expected one of \('arc', 'maze'\)"):
    tasks.evaluator_config("sudoku")


def test_maze_evaluator_on_a_non_square_dataset(built):
  info = dataset_format.load_split(built / "maze" / "test")
  info = dataclasses.replace(info, metadata=dataclasses.replace(info.metadata, seq_len=35))
  with pytest.raises(errors.UserError, match=r"'maze' needs square grids, but seq_len=35"):
    tasks.make_evaluators({"maze": {}}, built / "maze", info)


def test_arc_evaluator_settings_reach_it(built):
  info = dataset_format.load_split(built / "arc" / "test")
  (ev,) = tasks.make_evaluators(ml_collections.ConfigDict({"arc": tasks.evaluator_config(
      "arc", pass_ks=(1, 3), submission_k=1, aggregated_voting=False)}), built / "arc", info)
  voting = ev._ev  # pylint: disable=protected-access
  assert voting.pass_ks == (1, 3) and voting.submission_k == 1 and not voting.aggregated_voting
  assert ev.state() is None  # not pooled: nothing to save


def test_evaluator_keys_from_the_command_line():
  code = ("import sys; sys.argv = ['launch.py', '--config=configs/arc.py', '--config.evaluators.arc.pass_ks=1,2', "
          "'--config.evaluators.arc.submission_k=3']; import launch; launch.parse_flags(sys.argv); "
          "from trm_jax import tasks; print([s for _, _, s in tasks.evaluator_settings(launch.FLAGS.config.evaluators)])")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[{'pass_ks': (1, 2), 'submission_k': 3, 'aggregated_voting': True}]"


def test_old_checkpoint_with_evaluators_as_a_string_is_compatible():
  """A checkpoint's config from before (``evaluators="arc"`` and loose ``arc_*`` keys) against today's: the
  evaluators are not structural, so resuming and evaluating it are allowed."""
  from trm_jax.configs import arc as arc_config  # pylint: disable=g-import-not-at-top
  current = checkpoint_lib.config_to_dict(arc_config.get_config())
  saved = {k: v for k, v in current.items() if k != "evaluators"}
  saved.update(evaluators="arc", arc_pass_ks=[1, 2, 5, 10, 100, 1000], arc_submission_k=2,
               arc_aggregated_voting=True)
  checkpoint_lib.check_compatible(saved, current, "checkpoint 1")
  shapes = {"seq_len": 900}
  checkpoint_lib.check_resume({"config": saved, "dataset": shapes}, current, shapes, "checkpoint 1")


# ---------------------------------------------------------------------------
# trm_jax never imports data_prep.


def _data_prep_imports(path: pathlib.Path) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      names = [node.module or ""]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in
          ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
      names = [str(node.args[0].value)]
    found += [f"{path.relative_to(REPO)}:{node.lineno}: {n}" for n in names if n.split(".")[0] == "data_prep"]
  return found


def test_trm_jax_has_no_data_prep_import():
  """Not even a lazy one: data_prep depends on trm_jax, never the reverse (trm_jax.datasets runs the
  builders as subprocesses)."""
  found = [f for p in sorted((REPO / "trm_jax").rglob("*.py")) for f in _data_prep_imports(p)]
  assert not found, found


_RUN = """
import sys
import ml_collections
from trm_jax.configs import quickstart
from trm_jax import inference, predict, tasks, train, ttt
config = quickstart.get_config("maze")
with config.unlocked():
  config.data_path = sys.argv[1]
config.data_build_args.num_train = 40
config.data_build_args.num_test = 8
config.global_batch_size = 8
config.epochs = 2
config.eval_interval = 2
config.num_image_samples = 2
for k, v in dict(hidden_size=32, num_heads=2, L_layers=1, H_cycles=1, L_cycles=1, halt_max_steps=1).items():
  config.model[k] = v
summary = train.train_and_evaluate(config, sys.argv[2])
results = inference.evaluate_checkpoint(config, sys.argv[2])
print("RESULTS", sorted(results))
print("DATA_PREP", sorted(m for m in sys.modules if m.split(".")[0] == "data_prep"))
"""


def test_a_run_imports_no_data_prep(tmp_path):
  """A run that builds its dataset (data_build), trains, evaluates with the maze evaluator and draws, then
  evaluates its checkpoint, with trm_jax.predict and ttt imported: no data_prep module in the process."""
  import jax  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  if jax.config.jax_compilation_cache_dir:  # the session's cache (conftest): the eval compiles once
    env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  proc = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "data"), str(tmp_path / "run")], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "building the maze dataset" in proc.stdout
  assert json.loads((tmp_path / "data" / "test" / "dataset.json").read_text())["trm_jax"]["task"] == "maze"
  assert "'all/valid_shortest_accuracy'" in proc.stdout.split("RESULTS", 1)[1]
  assert "DATA_PREP []" in proc.stdout, proc.stdout[-2000:]


def test_data_build_error_is_one_line(tmp_path):
  from trm_jax import datasets  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UserError, match=r"^data_build='maze' into .*: data_build='maze': data_build_args: "
                                             r".*unexpected keyword argument 'grid'$"):
    datasets.build("maze", tmp_path / "data", {"grid": 3})
  assert not (tmp_path / "data").exists()
