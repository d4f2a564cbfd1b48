"""Faults injected as a cluster would cause them, and what each leaves behind (docs/reliability.md).

One tiny run is trained once per module (checkpoints 4 and 6, best 6); each
test damages a copy of it. Subprocesses only where the process boundary is
the point (kill -9, a second process on a workdir, SIGTERM, the command
line's exit status).
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import shared_paths
from data_prep import common
from test_train import tiny_config
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import data as data_lib
from trm_jax import errors
from trm_jax import inference
from trm_jax import integrity
from trm_jax import train
from trm_jax import workdir as workdir_lib

REPO = shared_paths.REPO_ROOT
SHARD = "all__examples-00000-of-00001.array_record"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("data") / "sudoku"
  sudoku.build_generated(path, num_train=24, num_test=20, num_aug=3, seed=0, target_clues=50)
  return path


def config(data_path, **overrides):
  """6 steps, evaluations at 3 and 6; lm_loss falls, so each evaluation is a new best."""
  base = {"best_metric": "all/lm_loss", "best_mode": "min", "checkpoint_every_steps": 2}
  return tiny_config(data_path, **{**base, **overrides})


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  summary = train.train_and_evaluate(config(dataset), workdir)
  return workdir, summary


def copy_run(reference, tmp_path):
  return pathlib.Path(shutil.copytree(reference[0], tmp_path / "run"))


def saved_state(workdir, step):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, read_only=True)
  try:
    return ckpt.latest.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore())).state
  finally:
    ckpt.close()


def largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_every_checkpoint_carries_a_manifest_that_verifies(reference):
  workdir, summary = reference
  assert summary["end_step"] == 6 and summary["best_step"] == 6
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "6"]
  assert [p.name for p in (workdir / "best").iterdir()] == ["6"]  # the old best went once the new one was on disk
  for step_dir in [workdir / "checkpoints" / "4", workdir / "checkpoints" / "6", workdir / "best" / "6"]:
    assert integrity.verify(step_dir, checkpoint_lib.ITEMS) is None
    files = json.loads((step_dir / integrity.MANIFEST).read_text())["files"]
    assert "state/manifest.ocdbt" in files and any(name.startswith("state/d/") for name in files)
  assert not (workdir / workdir_lib.LOCK_FILE).exists()  # released at the end


def _truncate(step_dir):
  path = largest_file(step_dir / "state")
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  return str(path.relative_to(step_dir))


def _flip_byte(step_dir):
  path = largest_file(step_dir / "state")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x01
  path.write_bytes(bytes(data))
  return str(path.relative_to(step_dir))


def _delete(relpath):
  def damage(step_dir):
    target = step_dir / relpath
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return relpath
  return damage


def _garbage_metadata(step_dir):
  (step_dir / "data" / "metadata").write_text("\x00garbage{")
  return "data/metadata"


DAMAGES = {"truncated": _truncate, "no_manifest_ocdbt": _delete("state/manifest.ocdbt"),
           "no_meta": _delete("meta"), "garbage_metadata": _garbage_metadata, "flipped_byte": _flip_byte}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(reference, tmp_path, damage):
  workdir = copy_run(reference, tmp_path)
  bad_file = DAMAGES[damage](workdir / "checkpoints" / "6")
  # Reading (eval/export): the damaged step is passed over, left where it is.
  reader = checkpoint_lib.Checkpointer(workdir, async_save=False, read_only=True)
  reader.close()
  assert reader.latest_step() == 4
  assert (workdir / "checkpoints" / "6").is_dir()
  # Training: moved aside, so that the run can write step 6 again.
  trainer = checkpoint_lib.Checkpointer(workdir, async_save=False, repair=True)
  trainer.close()
  assert trainer.latest_step() == 4
  [line] = trainer.damaged
  assert f"{workdir / 'checkpoints' / '6'} is damaged" in line and bad_file.rstrip("/").split("/")[0] in line
  if damage != "no_meta":
    assert bad_file in line
  assert not (workdir / "checkpoints" / "6").exists()
  assert (workdir / "damaged" / "checkpoints_6").is_dir()


def test_resume_from_the_intact_checkpoint_is_exact(reference, dataset, tmp_path, capsys):
  """A flipped byte in the latest step (not detectable by Orbax): resumed from 4, same end state."""
  workdir = copy_run(reference, tmp_path)
  _flip_byte(workdir / "checkpoints" / "6")
  summary = train.train_and_evaluate(config(dataset), workdir)
  assert summary["start_step"] == 4 and summary["end_step"] == 6
  err = capsys.readouterr().err
  assert err.count("is damaged") == 1 and "does not match its checksum" in err
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 6), saved_state(reference[0], 6))
  assert summary["last_eval"] == reference[1]["last_eval"]


KILL_IN_BEST_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_compilation_cache_dir", {cache!r})
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
from test_reliability import config
from trm_jax import integrity, train
write_manifest = integrity.write_manifest
def killing(step_dir, step):
  write_manifest(step_dir, step)
  if "/best/" in str(step_dir) and step == 6:  # the new best is written, not yet committed
    os.kill(os.getpid(), signal.SIGKILL)
integrity.write_manifest = killing
train.train_and_evaluate(config({data!r}), {workdir!r})
"""


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def test_kill_during_a_new_best_save_keeps_the_old_best(dataset, tmp_path):
  workdir = tmp_path / "run"
  script = KILL_IN_BEST_SAVE.format(tests=str(REPO / "tests"), cache=jax.config.jax_compilation_cache_dir or "",
                                    data=str(dataset), workdir=str(workdir))
  proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
  best = workdir / "best"
  assert (best / "3").is_dir() and integrity.verify(best / "3", checkpoint_lib.ITEMS) is None
  assert not (best / "6").exists()  # never committed
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, repair=True)
  ckpt.close()
  assert ckpt.best_step() == 3
  # The dead run's lock is still there; the next run takes it over.
  holder = json.loads((workdir / workdir_lib.LOCK_FILE).read_text())
  assert holder["host"] == socket.gethostname() and holder["pid"] != os.getpid()
  warnings = []
  with workdir_lib.WorkdirLock(workdir, warn=warnings.append):
    assert json.loads((workdir / workdir_lib.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert len(warnings) == 1 and f"pid {holder['pid']}" in warnings[0] and "gone" in warnings[0]


def _garble(path, lo, hi):
  data = bytearray(path.read_bytes())
  for i in range(lo, min(hi, len(data))):
    data[i] = (data[i] * 7 + 3) % 256
  path.write_bytes(bytes(data))


def test_failed_evaluation_keeps_the_training_and_is_redone_on_resume(reference, dataset, tmp_path):
  data = pathlib.Path(shutil.copytree(dataset, tmp_path / "data"))
  test_shard = data / "test" / SHARD
  good = test_shard.read_bytes()
  _garble(test_shard, 100, 2000)
  workdir = tmp_path / "run"
  with pytest.raises(errors.UserError, match=str(test_shard)):
    train.train_and_evaluate(config(data, checkpoint_every_steps=0), workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, read_only=True)
  assert ckpt.latest_step() == 3  # the first pass, saved before its evaluation failed
  assert ckpt.read_meta(3)["eval_pending"] == 3
  ckpt.close()
  test_shard.write_bytes(good)
  summary = train.train_and_evaluate(config(data, checkpoint_every_steps=0), workdir)
  assert summary["start_step"] == 3 and (workdir / "eval" / "step_3" / "results.json").is_file()
  assert summary["last_eval"] == reference[1]["last_eval"]
  jax.tree.map(np.testing.assert_array_equal, saved_state(workdir, 6), saved_state(reference[0], 6))


def _first_failing_batch(data_dir):
  it = data_lib.make_train_iterator(data_dir, global_batch_size=16, seed=0, epochs_per_iter=4)
  try:
    for i in range(6):
      next(it)
  except common.DatasetFormatError:
    return i
  finally:
    it.close()
  return None


def test_garbled_train_shard_mid_training_names_it_and_keeps_a_checkpoint(dataset, tmp_path):
  data = pathlib.Path(shutil.copytree(dataset, tmp_path / "data"))
  shard = data / "train" / SHARD
  good = shard.read_bytes()
  for offset in range(1400, 12000, 600):  # a chunk that the sampler first needs a few batches in
    _garble(shard, offset, offset + 10)
    failing = _first_failing_batch(data)
    if failing is not None and 2 <= failing <= 5:
      break
    shard.write_bytes(good)
  else:
    pytest.fail("no garbled chunk is first read at batches 2..5")
  workdir = tmp_path / "run"
  with pytest.raises(common.DatasetFormatError, match=f"{shard}: cannot read its records"):
    train.train_and_evaluate(config(data, checkpoint_every_steps=0, eval_interval=4), workdir)
  ckpt = checkpoint_lib.Checkpointer(workdir, async_save=False, read_only=True)
  ckpt.close()
  assert ckpt.latest_step() == failing  # every step trained before the bad batch


def test_failed_save_stops_at_once_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch, capsys):
  """A full disk, simulated by Orbax's JSON writer (it runs in the background save thread)."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
  real = json_checkpoint_handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access
  calls = []

  async def full_disk(self, x, directory):
    calls.append(directory)
    if len(calls) > 3:  # the first checkpoint's 3 JSON items fit
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await real(self, x, directory)
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
  workdir = tmp_path / "run"
  start = time.monotonic()
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as info:
    train.train_and_evaluate(config(dataset, checkpoint_every_steps=1), workdir)
  assert time.monotonic() - start < 120
  message = str(info.value)
  assert "\n" not in message and isinstance(info.value, errors.UserError)
  assert f"could not save checkpoint 2 in {workdir / 'checkpoints'}: No space left on device" in message
  assert "the last good checkpoint is step 1" in message
  steps = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
  assert int(steps[-1].split()[1].split("/")[0]) <= 4  # stopped within a log window, not at the end
  reader = checkpoint_lib.Checkpointer(workdir, async_save=False, repair=True)  # as the next run
  reader.close()
  assert reader.latest_step() == 1
  assert [p.name for p in (workdir / "checkpoints").iterdir()] == ["1"]  # no temporary directory left


def test_checkpoints_path_taken_by_a_file(dataset, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "best").write_text("in the way")
  with pytest.raises(checkpoint_lib.CheckpointSaveError, match=f"cannot save checkpoints in {workdir / 'best'}: "
                     "it is a file"):
    train.train_and_evaluate(config(dataset), workdir)
  assert not (workdir / "checkpoints").exists()  # stopped before training


def test_a_second_process_on_a_workdir_is_refused(reference, dataset, tmp_path):
  workdir = copy_run(reference, tmp_path)
  with workdir_lib.WorkdirLock(workdir):  # this process trains here
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "--config=configs/quickstart.py", f"--config.data_path={dataset}",
         "--config.data_build=", f"--workdir={workdir}"], cwd=REPO, env=_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: workdir {workdir} is in use by another run (pid {os.getpid()} on this host, since "
        f"{json.loads((workdir / '.lock').read_text())['since']}): stop it or use another --workdir; if that run "
        f"is dead, delete {workdir / '.lock'}"]
  assert not (workdir / ".lock").exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
  (tmp_path / ".lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "yesterday"}))
  with pytest.raises(workdir_lib.WorkdirError, match=r"pid 1 on host elsewhere.*delete .*\.lock"):
    workdir_lib.WorkdirLock(tmp_path).acquire()


@pytest.mark.parametrize("case", ["file", "under_file", "read_only", "immutable"])
def test_unusable_workdir_is_one_line(dataset, tmp_path, monkeypatch, case):
  workdir = tmp_path / "run"
  if case == "file":
    workdir.write_text("x")
    expected = f"workdir {workdir} is a file"
  elif case == "under_file":
    (tmp_path / "f").write_text("x")
    workdir = tmp_path / "f" / "run"
    expected = f"workdir {workdir} is under {tmp_path / 'f'}, which is a file"
  else:
    # Tests run as root, whom chmod does not stop: the filesystem's answer is simulated.
    workdir.mkdir()
    code = errno.EROFS if case == "read_only" else errno.EPERM
    real = pathlib.Path.write_text

    def refuse(self, *args, **kwargs):
      if str(self).startswith(str(workdir)):
        raise OSError(code, os.strerror(code), str(self))
      return real(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    expected = (f"workdir {workdir} is not usable: "
                + ("it is on a read-only filesystem" if case == "read_only" else "it is not writable"))
  with pytest.raises(workdir_lib.WorkdirError) as info:
    train.train_and_evaluate(config(dataset), workdir)
  assert str(info.value).startswith(expected) and isinstance(info.value, errors.UserError)
  if case in ("read_only", "immutable"):
    assert list(workdir.iterdir()) == []


def test_eval_on_a_missing_workdir_creates_nothing(dataset, tmp_path):
  with pytest.raises(errors.UserError, match="does not exist"):
    inference.evaluate_checkpoint(config(dataset), tmp_path / "missing")
  assert not (tmp_path / "missing").exists()


def test_export_output_under_a_file(reference, dataset, tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(errors.UserError, match=f"--output {tmp_path / 'f' / 'w.npz'}: cannot write it"):
    inference.export_weights(config(dataset), reference[0], tmp_path / "f" / "w.npz")


def test_resume_on_a_dataset_of_other_shapes(reference, dataset, tmp_path):
  other = pathlib.Path(shutil.copytree(dataset, tmp_path / "other"))
  for split in ("train", "test"):
    meta_path = other / split / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta["num_puzzle_identifiers"] += 5
    meta_path.write_text(json.dumps(meta))
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as info:
    train.train_and_evaluate(config(other), copy_run(reference, tmp_path))
  message = str(info.value)
  assert "trained on another dataset (num_puzzle_identifiers" in message
  assert f"--config.data_path={dataset}" in message and "strict" not in message


def test_resume_with_another_H_cycles_is_refused_unless_allowed(reference, dataset, tmp_path):
  workdir = copy_run(reference, tmp_path)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"model.H_cycles: checkpoint 2, config 3\).*--config.resume_allow_changes=model.H_cycles"):
    train.train_and_evaluate(config(dataset, **{"model.H_cycles": 3}), workdir)
  summary = train.train_and_evaluate(
      config(dataset, **{"model.H_cycles": 3, "resume_allow_changes": "model.H_cycles"}), workdir)
  assert summary["start_step"] == summary["end_step"] == 6
  # How the model is computed, not what: free to change (the kernels' launch parameters too).
  train.train_and_evaluate(config(dataset, **{"model.remat": "network",
                                              "model.kernel_params.swiglu_mlp_t.block_rows": 32}), workdir)


def test_empty_data_path_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="config.data_path is empty"):
    train.train_and_evaluate(config(""), tmp_path / "run")
  assert not (tmp_path / "run").exists()


BUILD_UNTIL_SIGNALLED = """
import sys
from data_prep import common
with common.DatasetWriter(sys.argv[1]) as ds:
  ds.set_writer("train", "all", seq_len=4, vocab_size=3)
  print("building", flush=True)
  sys.stdin.read()
"""


def test_sigterm_during_a_dataset_build_leaves_nothing(tmp_path):
  out = tmp_path / "data"
  proc = subprocess.Popen([sys.executable, "-c", BUILD_UNTIL_SIGNALLED, str(out)], cwd=REPO, env=_env(),
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "building\n"
  assert len(list(tmp_path.glob(".data.building-*"))) == 1
  proc.send_signal(signal.SIGTERM)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGTERM
  assert list(tmp_path.iterdir()) == []


def test_a_build_removes_what_killed_builds_left(tmp_path):
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  host = socket.gethostname()
  stale = tmp_path / f".data.building-{host}-{int(dead.stdout)}-abc"
  live = tmp_path / f".data.building-{host}-{os.getpid()}-abc"
  other_host = tmp_path / f".data.building-elsewhere-{int(dead.stdout)}-abc"
  for d in (stale, live, other_host):
    (d / "train").mkdir(parents=True)
  with common.DatasetWriter(tmp_path / "data"):
    pass
  assert not stale.exists() and live.exists() and other_host.exists()


@pytest.mark.parametrize("args, expected", [
    (["--config.lrr=1"], "error: --config: unknown key 'lrr'; Did you mean \"lr\" instead of \"lrr\"?"),
    (["--config=configs/nope.py"],
     "error: --config: cannot load the config file: [Errno 2] No such file or directory: 'configs/nope.py'"),
])
def test_command_line_mistakes_are_one_line(tmp_path, args, expected):
  proc = subprocess.run([sys.executable, str(REPO / "launch.py"), *args, f"--workdir={tmp_path / 'run'}"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert (proc.stdout + proc.stderr).strip().splitlines() == [expected]
  assert not (tmp_path / "run").exists()
