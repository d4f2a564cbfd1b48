"""The per-op kernel benchmark and its launch-parameter sweep (interpret mode on a CPU)."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags
import pytest

import shared_paths
from trm_jax.kernels import attention as attention_lib
from trm_jax.kernels import rms_norm as rms_norm_lib
from trm_jax.kernels import swiglu as swiglu_lib
from trm_jax import bench_kernels
from trm_jax import models
from trm_jax import ops
from trm_jax.models import trm


def _model(**overrides):
  fields = dict(seq_len=16, vocab_size=6, num_puzzle_identifiers=3, hidden_size=32, num_heads=2, L_layers=1,
                H_cycles=1, L_cycles=1, puzzle_emb_len=1, puzzle_emb_ndim=32, forward_dtype="float32")
  fields.update(overrides)
  return trm.TRMConfig(**fields)


def test_cases_follow_the_model_shapes():
  cases = {c.name: c for c in bench_kernels._cases(_model(), 3, list(bench_kernels.OPS))}
  assert set(cases) == {"attention", "rms_norm", "swiglu"}
  q = cases["attention"].args[0]
  assert q.shape == (3, 17, 2, 16) and cases["attention"].args[3].shape == (17, 16)  # RoPE tables
  assert cases["attention"].num_diff == 3  # the tables are constants, as in the model
  assert cases["swiglu"].args[1].shape == (32, 2 * 256)
  mlp_t = {c.name for c in bench_kernels._cases(_model(mlp_t=True), 3, list(bench_kernels.OPS))}
  assert mlp_t == {"rms_norm", "swiglu", "rms_norm_mlp_t", "swiglu_mlp_t"}  # no attention


def test_grid_phases():
  assert bench_kernels.grid("none", "attention") == []
  phases = bench_kernels.grid("small", "attention")
  assert [p[:2] for p in phases] == [("fwd", "fwd"), ("bwd", "fwd_bwd")]
  assert len(phases[0][2]) == 16 and {"block_q", "block_k"} <= set(phases[0][2][0])
  for op in bench_kernels.OPS:
    assert len(bench_kernels.grid("full", op)[0][2]) > len(bench_kernels.grid("small", op)[0][2])


def test_real_kernels_time_and_agree():
  rows = []
  model = _model()
  summary = bench_kernels.run(model, 2, ops=list(bench_kernels.OPS), sweep="small", max_candidates=1, iters=1,
                              emit=rows.append)
  assert rows[-1] == {"summary": summary}
  best = {}
  for name in ("attention", "rms_norm", "swiglu"):
    info = summary["cases"][name]
    assert info["pallas_default_error"] < 1e-4, (name, info)
    for key in ("xla_fwd_ms", "xla_fwd_bwd_ms", "pallas_fwd_ms", "pallas_fwd_bwd_ms", "best_fwd_bwd_ms"):
      assert info[key] > 0, (name, key)
    assert info["block_sizes"] == getattr(model.kernel_params, name).to_dict()
    best[name] = info["best_block_sizes"]
  swept = [r for r in rows if "phase" in r]
  # Per phase the config's values and the first grid candidate, each valid and in agreement.
  assert len(swept) == 2 * 5 and all("error" not in r and "rejected" not in r for r in swept), swept
  assert _overridden_kernel_params(summary["config_overrides"]) == ops.KernelParams.from_dict(best)
  timed = [r for r in rows if "ms" in r]
  assert {r["case"] for r in timed} == {"attention", "rms_norm", "swiglu"}
  assert all("tflops_per_s" in r for r in timed if r["case"] != "rms_norm")


def _overridden_kernel_params(overrides: list[str]) -> ops.KernelParams:
  """The model's kernel_params of configs/quickstart.py with these command-line overrides, parsed
  as the training command parses them."""
  argv = ["train", f"--config={shared_paths.REPO_ROOT / 'configs/quickstart.py'}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  fields = dict(flag_values.config.model.to_dict(), seq_len=16, vocab_size=6, num_puzzle_identifiers=3)
  return models.config_from_dict(fields).kernel_params


def _fake_case(model, batch, ops):
  """An rms_norm case whose "kernel" does not compile with 8 rows and is wrong unless num_warps == 4."""
  del ops
  x = jax.random.normal(jax.random.key(0), (batch, 8, 32), jnp.float32)
  reference = functools.partial(rms_norm_lib.residual_rms_norm_reference, eps=1e-5)

  def pallas(x, residual, block_sizes):
    if block_sizes.block_rows == 8:
      raise ValueError(f"block_rows {block_sizes.block_rows} does not compile")
    return reference(x, residual) * (1.0 if block_sizes.num_warps == 4 else 2.0)
  return [bench_kernels.Case("rms_norm", "rms_norm", (x, x + 1), reference, pallas, model.kernel_params.rms_norm,
                             0.0, 1.0, {"shape": [batch, 8, 32], "dtype": "float32"})]


def test_sweep_skips_failures_rejects_wrong_outputs_and_prints_overrides(monkeypatch):
  monkeypatch.setattr(bench_kernels, "_cases", _fake_case)
  candidates = [{"block_rows": 3}, {"block_rows": 8}, {"block_rows": 4, "num_warps": 2},
                {"block_rows": 16, "num_warps": 4}]
  monkeypatch.setattr(bench_kernels, "grid", lambda sweep, op: [("fwd_bwd", "fwd_bwd", candidates)])
  rows = []
  model = _model(kernel_params={"rms_norm": {"num_warps": 2}})  # a config that overrides a default
  summary = bench_kernels.run(model, 2, ops=["rms_norm"], sweep="small", iters=1, emit=rows.append)
  swept = [r for r in rows if r.get("phase") == "fwd_bwd"]
  assert len(swept) == 5 and swept[0]["params"] == {}  # the config's own values come first
  assert "forward error" in swept[0]["rejected"]
  assert "block_rows=3: expected a power of two" in swept[1]["error"]  # checked by RMSNormBlockSizes
  assert "block_rows 8 does not compile" in swept[2]["error"]
  assert "forward error" in swept[3]["rejected"]
  assert "rejected" not in swept[4] and swept[4]["error_vs_reference"] == 0.0
  assert summary["cases"]["rms_norm"]["best_params"] == {"block_rows": 16, "num_warps": 4}
  # The best result as the flags a user adds to the training command (values that differ from the
  # defaults: num_warps is back at its default), which the config accepts.
  assert summary["config_overrides"] == ["--config.model.kernel_params.rms_norm.block_rows=16"]
  params = _overridden_kernel_params(summary["config_overrides"])
  assert params == ops.KernelParams(rms_norm=rms_norm_lib.RMSNormBlockSizes(block_rows=16))


def test_overrides_keep_what_the_config_already_set():
  params = ops.KernelParams(swiglu_mlp_t=swiglu_lib.SwiGLUBlockSizes(matmul_impl="pallas", num_warps=8))
  best = {"attention": attention_lib.AttentionBlockSizes(block_q=128, num_stages_bwd=1)}
  overrides = bench_kernels.config_overrides(params, best)
  assert overrides == ["--config.model.kernel_params.attention.block_q=128",
                       "--config.model.kernel_params.attention.num_stages_bwd=1",
                       "--config.model.kernel_params.swiglu_mlp_t.matmul_impl=pallas",
                       "--config.model.kernel_params.swiglu_mlp_t.num_warps=8"]
  assert _overridden_kernel_params(overrides) == dataclasses.replace(params, **best)


def test_cli_writes_json_lines(tmp_path):
  out = tmp_path / "kernels.jsonl"
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT))
  args = ["--config=configs/quickstart.py", "--config.data_path=none", "--seq_len=16", "--batch_per_device=2",
          "--config.model.hidden_size=32", "--ops=rms_norm", "--iters=1", "--sweep=small", "--max_candidates=1",
          f"--output={out}"]
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench_kernels", *args], cwd=shared_paths.REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
  assert [json.loads(l) for l in out.read_text().splitlines()] == lines
  summary = lines[-1]["summary"]
  assert set(summary["cases"]) == {"rms_norm", "rms_norm_mlp_t"}  # quickstart is mlp_t
  # The sweep's result, as the one line of flags to paste (stdout keeps only JSON lines).
  pasted = " ".join(summary["config_overrides"]) or "(none: the default parameters were the fastest measured)"
  assert f"best launch parameters, as config overrides: {pasted}\n" in proc.stderr
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench_kernels", *args[:-1], "--ops=attn"],
                        cwd=shared_paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--ops" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sweep", ["small", "full"])
def test_every_grid_candidate_is_accepted_by_its_op(sweep):
  """Each swept parameter is a field of the op's BlockSizes, with a value it accepts (no typo sweeps)."""
  model = _model()
  for case in bench_kernels._cases(model, 1, list(bench_kernels.OPS)):
    for _, _, candidates in bench_kernels.grid(sweep, case.op):
      for params in candidates[:1] + candidates[-1:]:
        jax.eval_shape(case.kernel(params), *case.args)
