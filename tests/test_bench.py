"""The benchmark CLI runs on a CPU and reports what it promises."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

import shared_paths
from trm_jax import bench
from trm_jax.models import trm

ARGS = ["--config=configs/quickstart.py", "--config.data_path=none", "--seq_len=16", "--vocab_size=6",
        "--num_puzzle_identifiers=3", "--batch_per_device=4", "--steps=2", "--eval_steps=1",
        "--config.model.hidden_size=32", "--config.model.num_heads=2", "--config.model.halt_max_steps=2"]


def test_bench_prints_one_json_line():
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT))
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench", *ARGS, "--matmul_peak"], cwd=shared_paths.REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1
  result = json.loads(lines[0])
  for key in ("train_steps_per_s", "train_tokens_per_s", "train_flops_per_step", "train_mfu", "train_hfu", "compile_train_s",
              "eval_batches_per_s", "peak_memory_bytes", "kernels", "device"):
    assert key in result, key
  assert result["train_steps_per_s"] > 0 and result["global_batch"] == 4 and result["seq_len"] == 16
  assert abs(result["train_s_per_step"] * result["train_steps_per_s"] - 1) < 1e-9
  assert result["train_process_cpu_s_per_step"] > 0
  assert result["train_mfu"] is None  # no known peak for a CPU
  # The blocked steps' spread, the FLOP rate, and the matmul ceiling that stands in for a peak.
  assert 0 < result["train_s_per_step_min"] <= result["train_s_per_step_median"]
  assert result["train_flops_per_s"] == pytest.approx(result["train_flops_per_step"] / result["train_s_per_step"])
  assert result["matmul_size"] == 2048 and result["matmul_dtype"] == "float32"
  assert result["matmul_flops_per_s"] > 0
  assert result["train_matmul_fraction"] == pytest.approx(
      result["train_flops_per_step"] / result["train_s_per_step_median"] / result["matmul_flops_per_s"])
  # A run's CPU settings apply to the benchmark too (trm_jax.cpu_runtime).
  assert result["cpu_runtime"]["inline_dispatch"] is True
  assert result["train_minor_page_faults_per_step"] >= 0


def test_flops_formula():
  model = trm.TRMConfig(seq_len=900, vocab_size=12, num_puzzle_identifiers=10, hidden_size=512, num_heads=8,
                        L_layers=2, H_cycles=3, L_cycles=4, puzzle_emb_len=16)
  b, length, d, inter = 1, 916, 512, 1536
  per_layer = 2 * length * d * 3 * d + 2 * length * d * d + 4 * length * length * d + 2 * length * d * 3 * inter
  assert bench.block_flops(model, b) == per_layer
  flops = bench.step_flops(model, b)
  heads = 2 * 900 * 512 * 12 + 2 * 512 * 2
  assert flops["eval_call"] == 3 * 5 * 2 * per_layer + heads
  assert flops["train"] == flops["eval_call"] + 2 * (5 * 2 * per_layer + heads)
  assert flops["train_recomputed"] == 0
  network = bench.step_flops(dataclasses.replace(model, remat="network"), b)
  assert network["train"] == flops["train"] and network["train_recomputed"] == 5 * 2 * per_layer
  attention = bench.step_flops(dataclasses.replace(model, remat="attention"), b)
  assert attention["train_recomputed"] == 5 * 2 * 4 * length * length * d


def _tiny_config():
  from trm_jax.configs import quickstart
  config = quickstart.get_config()
  config.unlock()
  config.data_path = "none"
  config.model.hidden_size = 32
  config.model.num_heads = 2
  config.model.halt_max_steps = 2
  config.lock()
  return config


DIMS = dict(seq_len=16, vocab_size=6, num_puzzle_identifiers=3)


def test_find_max_batch_returns_the_largest_batch_that_fits():
  config = _tiny_config()
  granularity = 4
  limit = bench.train_step_memory(config, 12, **DIMS) + 1
  batch, probes = bench.find_max_batch(config, limit, granularity=granularity, **DIMS)
  assert batch == 12
  measured = {p["batch_per_device"]: p["bytes"] for p in probes}
  assert measured[12] <= limit < measured[16]  # 16 was tried and did not fit
  assert all(b % granularity == 0 for b in measured)
  assert len(probes) <= 5  # two for the line, then a few checks, not a scan


def test_find_max_batch_rejects_a_limit_below_the_smallest_batch():
  config = _tiny_config()
  try:
    bench.find_max_batch(config, 1000, granularity=4, **DIMS)
  except ValueError as e:
    assert "batch_per_device=4" in str(e) and "limit" in str(e)
  else:
    raise AssertionError("expected a ValueError")


def test_bench_cli_find_max_batch():
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT))
  args = [a for a in ARGS if not a.startswith("--batch_per_device")]
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench", *args, "--find_max_batch", "--memory_limit_gb=0.02",
                         "--batch_granularity=4", "--skip_eval"], cwd=shared_paths.REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  search = result["max_batch_search"]
  assert result["global_batch"] == search["batch_per_device"] >= 4
  fitting = [p for p in search["probes"] if p["bytes"] <= search["memory_limit_bytes"]]
  assert max(p["batch_per_device"] for p in fitting) == search["batch_per_device"]
  # Without a limit, a CPU (no allocator limit) gets a clear error, not a traceback.
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench", *args, "--find_max_batch"],
                        cwd=shared_paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--memory_limit_gb" in proc.stderr and "Traceback" not in proc.stderr


def test_remat_lowers_the_train_step_memory():
  """Compiled memory (CPU buffer assignment) of a step where the [B, H, S, S] softmax dominates."""
  config = _tiny_config()
  config.unlock()
  config.model.mlp_t = False
  config.model.num_heads = 4
  memory = {}
  for remat in ("none", "attention", "network"):
    config.model.remat = remat
    memory[remat] = bench.train_step_memory(config, 8, seq_len=128, vocab_size=6, num_puzzle_identifiers=3)
  assert memory["attention"] < 0.8 * memory["none"], memory
  assert memory["network"] < 0.8 * memory["none"], memory


def test_profile_says_where_the_step_time_goes(tmp_path):
  result = bench.benchmark(_tiny_config(), batch_per_device=4, num_steps=1, skip_eval=True,
                           profile_dir=str(tmp_path / "trace"), profile_steps=2, **DIMS)
  profile = result["train_profile"]
  assert profile["trace"].startswith(str(tmp_path / "trace")) and profile["trace"].endswith(".xplane.pb")
  assert sum(profile["share"].values()) == pytest.approx(1.0)
  assert profile["share"]["matmul"] > 0 and profile["ops_per_step"] > 10  # a TRM step is many products
  assert 0 < len(profile["top_ops_ms_per_step"]) <= 10
  assert profile["op_ms_per_step"] >= max(profile["top_ops_ms_per_step"].values())
  # Every op of every step, whichever thread ran it (with inline dispatch a whole
  # step may run on the calling thread), and only ops: the same count each time.
  counts = {profile["ops_per_step"]}
  for i in range(2):
    again = bench.benchmark(_tiny_config(), batch_per_device=4, num_steps=1, skip_eval=True,
                            profile_dir=str(tmp_path / f"trace{i}"), profile_steps=2, **DIMS)
    counts.add(again["train_profile"]["ops_per_step"])
  assert len(counts) == 1, counts


def test_op_kinds():
  from trm_jax import step_profile  # pylint: disable=g-import-not-at-top
  assert [step_profile.kind_of(n) for n in ("ynn_fusion", "dot", "copy_bitcast_fusion", "transpose_copy_fusion",
                                            "reduce_fusion", "add_divide_fusion", "triton_gemm")] == [
      "matmul", "matmul", "copy_transpose", "copy_transpose", "reduce", "elementwise_other", "matmul"]
