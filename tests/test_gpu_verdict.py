"""trm_jax.gpu_verdict: the smoke run's JSON, the budget's skips and the targets' evaluation."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

import shared_paths
from trm_jax import gpu_verdict
from trm_jax import verdict_parts

# The smoke run below: every kind of part but the Sudoku repeats and the batch search (each one more
# train-step compile; `--smoke` alone runs them, docs/benchmarks.md).
SMOKE_PARTS = "env,correctness,arc_xla,arc_pallas,arc_original"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("verdict")
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT))
  proc = subprocess.run([sys.executable, "-m", "trm_jax.gpu_verdict", f"--out={out}", "--smoke",
                         f"--parts={SMOKE_PARTS}", f"--golden_dir={shared_paths.GOLDEN_DIR}",
                         f"--orig={out / 'no_copy_here'}"],
                        cwd=shared_paths.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out, json.loads((out / "summary.json").read_text())


def _read(out: pathlib.Path, name: str) -> dict:
  return json.loads((out / f"{name}.json").read_text())


def test_smoke_measures_every_requested_part(smoke):
  out, summary = smoke
  parts = summary["parts"]
  expected = {"env", "golden_0", "kernel_tests", "arc_xla", "arc_pallas", "arc_original", "sudoku_xla",
              "sudoku_pallas", "sudoku_original", "arc_xla_max", "arc_pallas_max"}
  assert set(parts) == expected
  for name in ("env", "golden_0", "kernel_tests", "arc_xla", "arc_pallas"):
    assert parts[name]["status"] == "ok", (name, parts[name])
  for name in ("sudoku_xla", "sudoku_pallas", "sudoku_original", "arc_xla_max", "arc_pallas_max"):
    assert parts[name] == {"status": "skipped", "reason": "not in --parts"}
  env = _read(out, "env")
  assert env["versions"]["jax"] and env["devices"][0]["platform"] == "cpu"
  assert env["workloads"]["arc"]["original_model"]["hidden_size"] == 32
  assert "kernels" not in env["workloads"]["arc"]["original_model"]
  golden = _read(out, "golden")
  assert golden["ok"] and set(golden["files"]) == {"stablemax_ce.npz", "adam_atan2.npz"}
  kernel_tests = _read(out, "kernel_tests")
  assert kernel_tests["runner"] == "pytest" and kernel_tests["ok"] and kernel_tests["passed"] > 0
  for variant, remat in (("xla", "network"), ("pallas", "none")):
    bench = _read(out, f"arc_{variant}")
    assert (bench["kernels"], bench["remat"], bench["global_batch"]) == (variant, remat, 2)
    assert bench["train_steps_per_s"] > 0 and bench["train_tokens_per_s"] > 0


def test_smoke_original_skipped_with_its_reason(smoke):
  out, summary = smoke
  original = _read(out, "arc_original")
  assert summary["parts"]["arc_original"]["status"] == "skipped"
  assert original["status"] == "skipped"
  assert "torch" in original["reason"] or "no copy of the original" in original["reason"]


def test_smoke_targets_come_from_the_measured_numbers(smoke):
  out, summary = smoke
  targets = {(t["target"], t["workload"]): t for t in summary["targets"]}
  ratio = targets[("pallas_vs_xla", "arc")]
  xla, pallas = _read(out, "arc_xla")["train_steps_per_s"], _read(out, "arc_pallas")["train_steps_per_s"]
  assert ratio["value"] == pytest.approx(pallas / xla)
  assert ratio["status"] == ("pass" if pallas / xla >= 1.3 else "fail")
  assert targets[("ours_vs_original", "arc")]["status"] == "not-measured"
  assert "arc_original" in targets[("ours_vs_original", "arc")]["reason"]
  assert targets[("mfu", "arc")]["status"] == "not-measured"  # a CPU has no known peak
  rows = {(r["workload"], r["impl"]): r for r in summary["comparison"]}
  assert rows[("arc", "xla")]["train_steps_per_s"] == xla and set(rows) == {("arc", "xla"), ("arc", "pallas")}


def test_budget_too_small_skips_every_part_with_the_reason(tmp_path):
  assert gpu_verdict.main([f"--out={tmp_path}", "--smoke", "--budget_s=5",
                           f"--golden_dir={shared_paths.GOLDEN_DIR}"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["parts"] and all(p["status"] == "skipped" for p in summary["parts"].values())
  assert "time budget" in summary["parts"]["env"]["reason"]
  assert summary["parts"]["arc_original"]["reason"] == "the env part did not write the workload's config"
  assert {t["status"] for t in summary["targets"]} == {"not-measured"}


def _ok(rate, **extra):
  return {"status": "ok", "train_steps_per_s": rate, **extra}


def test_targets_pass_fail_and_not_measured():
  results = {"arc_xla": _ok(1.0, train_mfu=0.3), "arc_pallas": _ok(1.5, train_mfu=0.45),
             "arc_original": _ok(0.8, compile=True), "arc_pallas_max": _ok(1.2, train_mfu=0.55),
             "sudoku_xla": _ok(2.0), "sudoku_pallas": {"status": "failed", "train_steps_per_s": 9.0},
             "sudoku_original": _ok(1.6, compile=False, compile_error="BackendCompilerFailed")}
  targets = {(t["target"], t["workload"]): t for t in gpu_verdict.evaluate_targets(results)}
  assert targets[("pallas_vs_xla", "arc")]["value"] == pytest.approx(1.5)
  assert targets[("pallas_vs_xla", "arc")]["status"] == "pass"
  arc = targets[("ours_vs_original", "arc")]
  assert (arc["value"], arc["status"], arc["inputs"]["ours_impl"]) == (pytest.approx(1.875), "pass", "pallas")
  assert arc["inputs"]["ratio_by_impl"]["xla"] == pytest.approx(1.25)
  sudoku = targets[("ours_vs_original", "sudoku")]  # a failed part's number is not used
  assert (sudoku["value"], sudoku["status"], sudoku["inputs"]["ours_impl"]) == (pytest.approx(1.25), "fail", "xla")
  assert "ran eagerly" in sudoku["note"]
  mfu = targets[("mfu", "arc")]
  assert (mfu["value"], mfu["status"], mfu["inputs"]["best_run"]) == (0.55, "pass", "arc_pallas_max")
  del results["arc_xla"]
  assert gpu_verdict.evaluate_targets(results)[0]["status"] == "not-measured"


def test_plain_kernel_checks_compare_ops_with_their_references(tmp_path):
  """The path taken where pytest is absent: a Pallas op against its reference, values and gradients."""
  workload = gpu_verdict.SMOKE_WORKLOADS["arc"]
  spec = {"runner": "plain", "checks": [{"config": workload["config"], "dims": workload["dims"],
                                         "overrides": workload["overrides"], "batch": 1, "ops": ["rms_norm"]}]}
  result = verdict_parts.part_kernel_tests(spec, tmp_path / "kernel_tests.json")
  assert result["runner"] == "plain" and result["ok"], result
  (case,) = result["cases"]
  assert case["case"] == "rms_norm" and len(case["grad_errors"]) == 2
  assert 0 <= case["forward_error"] <= case["tolerance"] and max(case["grad_errors"]) <= case["tolerance"]


@pytest.mark.parametrize("flag", ["--parts=arc_xla,nonsense", "--cap=golden=10", "--cap=bench=soon"])
def test_bad_flags_end_in_one_line_error(tmp_path, capsys, flag):
  assert gpu_verdict.main([f"--out={tmp_path}", "--smoke", flag, f"--golden_dir={shared_paths.GOLDEN_DIR}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --") and len(err.splitlines()) == 1
