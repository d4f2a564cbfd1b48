"""Meshes, sharded steps, two processes, and restoring onto another mesh (CPU devices).

Device counts are fixed when jax starts, so the multi-device checks run in
subprocesses with ``--xla_force_host_platform_device_count``.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import shared_paths
from trm_jax import sharding

REPO = shared_paths.REPO_ROOT
TOL = 1e-5


def _env(devices: int, **extra) -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update(extra)
  return env


def test_mesh_shapes():
  assert sharding.resolve_mesh_shape(sharding.MeshShape(), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape(sharding.MeshShape(data=-1, fsdp=2, model=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="do not divide"):
    sharding.resolve_mesh_shape(sharding.MeshShape(fsdp=3), 8)
  with pytest.raises(ValueError, match="but there are 8 devices"):
    sharding.resolve_mesh_shape(sharding.MeshShape(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.resolve_mesh_shape(sharding.MeshShape(data=-1, fsdp=-1), 8)
  mesh = sharding.make_mesh()
  assert mesh.axis_names == sharding.AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_table_rows_pad_to_the_device_count():
  mesh = sharding.make_mesh()
  assert sharding.padded_table_rows(37, mesh) % mesh.size == 0
  table = np.arange(12, dtype=np.float32).reshape(6, 2)
  padded = sharding.pad_table(table, 8)
  np.testing.assert_array_equal(padded[:6], table)
  assert not padded[6:].any()
  np.testing.assert_array_equal(sharding.pad_table(padded, 6), table)


def test_sharded_steps_match_single_device():
  """8 host devices: data, data x fsdp and data x fsdp x model meshes against one device."""
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_steps.py")], env=_env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(results) == {"data8", "data4_fsdp2", "data2_fsdp2_model2"}
  for name, r in results.items():
    for key in ("params", "ema", "table", "metrics"):
      assert r[key] <= TOL, (name, key, r[key])
    assert r["table_shard_rows"] == [5]  # 37 ids padded to 40 rows, split by rows over 8 devices
  assert results["data8"]["qkv_shard_shapes"] == [[32, 96]]  # replicated
  assert results["data4_fsdp2"]["qkv_shard_shapes"] == [[32, 48]]  # fsdp splits the larger axis
  assert results["data2_fsdp2_model2"]["qkv_shard_shapes"] == [[16, 48]]  # and model the outputs


def test_sharded_hrm_steps_match_single_device():
  """Another architecture through the same meshes: HRM's two levels, its halting on
  q_halt > q_continue and its second (target) forward."""
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_steps.py"), "hrm"], env=_env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, r in results.items():
    for key in ("params", "ema", "table", "metrics"):
      assert r[key] <= TOL, (name, key, r[key])
  assert results["data2_fsdp2_model2"]["qkv_shard_shapes"] == [[16, 48]]


# ---------------------------------------------------------------------------
# launch.py across processes and meshes, against one single-device run.

ARGS = ["--config=configs/quickstart.py", "--config.data_build=", "--config.global_batch_size=16",
        "--config.epochs=4", "--config.eval_interval=2", "--config.log_every_steps=2",
        "--config.lr_warmup_steps=2", "--config.model.hidden_size=32", "--config.model.num_heads=2",
        "--config.model.L_layers=1", "--config.model.H_cycles=2", "--config.model.L_cycles=1",
        "--config.model.halt_max_steps=2"]


def _launch(data, workdir, devices, *extra, env_extra=None, wait=True):
  cmd = [sys.executable, str(REPO / "launch.py"), *ARGS, f"--config.data_path={data}", f"--workdir={workdir}",
         *extra]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(devices, **(env_extra or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if not wait:
    return proc
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return out


def _export(data, workdir, devices=1):
  out_path = pathlib.Path(workdir) / "final.npz"
  _launch(data, workdir, devices, "--mode=export", f"--output={out_path}")
  with np.load(out_path) as z:
    return {k: z[k] for k in z.files}


def _assert_close(a, b):
  assert set(a) == set(b)
  for k in a:
    err = np.abs(a[k].astype(np.float64) - b[k]).max() / max(np.abs(b[k]).max(), 1e-12)
    assert err <= TOL, (k, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("mesh")
  sudoku.build_generated(root / "data", num_train=24, num_test=20, num_aug=3, seed=0, target_clues=50)
  _launch(root / "data", root / "single", 1)
  return root, _export(root / "data", root / "single")


def test_two_processes_match_one(reference):
  """Two processes on localhost (gloo collectives), two CPU devices each."""
  root, expected = reference
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [_launch(root / "data", root / "multi", 2, f"--coordinator_address=localhost:{port}",
                   "--num_processes=2", f"--process_id={i}",
                   env_extra={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}, wait=False) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "4 device(s)" in outs[0] and "eval @ step" in outs[0]
  assert "eval @ step" not in outs[1]  # only process 0 logs
  assert not (root / "multi" / "tensorboard").exists() or len(list((root / "multi" / "tensorboard").iterdir())) == 1
  _assert_close(_export(root / "data", root / "multi"), expected)


def test_restore_onto_another_mesh(reference):
  """Saved on 8 devices mid-run, resumed on 2 (the table's padding rows change too)."""
  root, expected = reference
  out = _launch(root / "data", root / "remesh", 8, "--config.max_steps=4")
  assert "8 device(s)" in out
  out = _launch(root / "data", root / "remesh", 2)
  assert "resuming at step 4" in out and "2 device(s)" in out
  _assert_close(_export(root / "data", root / "remesh"), expected)


def test_sigterm_to_one_process_stops_both(reference, tmp_path):
  """The stop is agreed on: both processes save the same checkpoint and exit cleanly."""
  root, _ = reference
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [_launch(root / "data", tmp_path, 1, "--config.epochs=400", "--config.eval_interval=200",
                   f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
                   env_extra={"JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}, wait=False) for i in range(2)]
  lines = []
  for line in procs[0].stdout:
    lines.append(line)
    if line.startswith("step 2/"):
      procs[0].send_signal(signal.SIGTERM)
      break
  outs = ["".join(lines) + procs[0].communicate(timeout=300)[0], procs[1].communicate(timeout=300)[0]]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  assert "stopped by SIGTERM" in outs[0]
  steps_saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert steps_saved and steps_saved[-1] >= 2
