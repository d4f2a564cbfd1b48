"""The per-op kernel benchmark and its launch-parameter sweep (interpret mode on a CPU)."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import shared_paths
from trm_jax.kernels import rms_norm as rms_norm_lib
from trm_jax import bench_kernels
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
  summary = bench_kernels.run(_model(), 2, ops=list(bench_kernels.OPS), sweep="small", max_candidates=1, iters=1,
                              emit=rows.append)
  assert rows[-1] == {"summary": summary}
  for name in ("attention", "rms_norm", "swiglu"):
    info = summary["cases"][name]
    assert info["pallas_default_error"] < 1e-4, (name, info)
    for key in ("xla_fwd_ms", "xla_fwd_bwd_ms", "pallas_fwd_ms", "pallas_fwd_bwd_ms", "best_fwd_bwd_ms"):
      assert info[key] > 0, (name, key)
    assert info["best_params"], name  # every phase produced a valid candidate
  timed = [r for r in rows if "ms" in r]
  assert {r["case"] for r in timed} == {"attention", "rms_norm", "swiglu"}
  assert all("tflops_per_s" in r for r in timed if r["case"] != "rms_norm")


def _fake_case(model, batch, ops):
  """An rms_norm case whose "kernel" is wrong unless scale == 1."""
  del model, ops
  x = jax.random.normal(jax.random.key(0), (batch, 8, 32), jnp.float32)
  reference = functools.partial(rms_norm_lib.residual_rms_norm_reference, eps=1e-5)

  def pallas(x, residual, scale=1.0, block_rows=16):
    if block_rows not in (4, 16):
      raise ValueError(f"block_rows {block_rows} does not compile")
    return reference(x, residual) * scale
  return [bench_kernels.Case("rms_norm", "rms_norm", (x, x + 1), reference, pallas, 0.0, 1.0,
                             {"shape": [batch, 8, 32], "dtype": "float32"})]


def test_sweep_skips_failures_and_rejects_wrong_outputs(monkeypatch):
  monkeypatch.setattr(bench_kernels, "_cases", _fake_case)
  candidates = [{"block_rows": 3, "scale": 1.0}, {"block_rows": 4, "scale": 2.0}, {"block_rows": 16, "scale": 1.0}]
  monkeypatch.setattr(bench_kernels, "grid", lambda sweep, op: [("fwd_bwd", "fwd_bwd", candidates)])
  rows = []
  summary = bench_kernels.run(None, 2, ops=["rms_norm"], sweep="small", iters=1, emit=rows.append)
  swept = [r for r in rows if r.get("phase") == "fwd_bwd"]
  assert len(swept) == 3
  assert "does not compile" in swept[0]["error"]
  assert "forward error" in swept[1]["rejected"]
  assert "rejected" not in swept[2] and swept[2]["error_vs_reference"] == 0.0
  assert summary["cases"]["rms_norm"]["best_params"] == {"block_rows": 16, "scale": 1.0}


def test_cli_writes_json_lines(tmp_path):
  out = tmp_path / "kernels.jsonl"
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT))
  args = ["--config=configs/quickstart.py", "--config.data_path=none", "--seq_len=16", "--batch_per_device=2",
          "--config.model.hidden_size=32", "--ops=rms_norm", "--iters=1", f"--output={out}"]
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench_kernels", *args], cwd=shared_paths.REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  lines = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
  assert [json.loads(l) for l in out.read_text().splitlines()] == lines
  summary = lines[-1]["summary"]
  assert set(summary["cases"]) == {"rms_norm", "rms_norm_mlp_t"}  # quickstart is mlp_t
  proc = subprocess.run([sys.executable, "-m", "trm_jax.bench_kernels", *args[:-1], "--ops=attn"],
                        cwd=shared_paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2 and "--ops" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("sweep", ["small", "full"])
def test_every_grid_candidate_is_accepted_by_its_op(sweep):
  """Each swept parameter is a keyword the op takes, with a value it accepts (no typo sweeps)."""
  model = _model()
  for case in bench_kernels._cases(model, 1, list(bench_kernels.OPS)):
    for _, _, candidates in bench_kernels.grid(sweep, case.op):
      for params in candidates[:1] + candidates[-1:]:
        jax.eval_shape(functools.partial(case.pallas, **params), *case.args)
