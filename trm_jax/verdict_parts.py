r"""The JAX-side measurements of ``trm_jax.gpu_verdict``, one per child process.

  python -m trm_jax.verdict_parts KIND --spec='{...}' --out=RESULT.json

``KIND`` is one of ``env``, ``golden``, ``kernel_tests``, ``bench`` and
``max_batch``. Each runs in its own process so that a hang or a crash can be
killed on time, device memory statistics (the allocator's peak) belong to one
measurement, and no JAX process holds GPU memory while the PyTorch one runs.
Every part writes its JSON after each increment, so one killed at its deadline
still leaves what it measured. The numbers come from the project's own tools,
called as functions: ``trm_jax.golden`` (the golden checks),
``trm_jax.bench`` (``benchmark``, ``find_max_batch``) and, where pytest is
absent, the op cases of ``trm_jax.bench_kernels``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax",
            "optax", "orbax-checkpoint", "chex", "numpy", "ml-collections", "grain", "array-record", "tensorboardX",
            "triton", "torch", "pytest", "numba", "pillow")
# Keys of the model config that only this project has (the original's config lacks them).
OURS_ONLY = ("kernels", "remat", "kernel_params")


def _write(out: pathlib.Path, result: dict) -> None:
  out.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _error(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text[:1500]}"


def load_config(name: str, overrides: dict[str, Any]):
  """``configs/<name>.py`` (``name`` may carry ``:variant``) with dotted-key overrides."""
  module_name, _, variant = name.partition(":")
  config = importlib.import_module(f"trm_jax.configs.{module_name}").get_config(variant or None)
  for key, value in overrides.items():
    *path, leaf = key.split(".")
    node = config
    for part in path:
      node = getattr(node, part)
    setattr(node, leaf, value)  # a locked ConfigDict names an unknown key
  return config


# ---------------------------------------------------------------------------
# env: versions, devices, nvidia-smi, and the workloads' configs for the torch side.


def part_env(spec: dict, out: pathlib.Path) -> dict:
  versions = {}
  for package in PACKAGES:
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  result: dict[str, Any] = {"status": "running", "python": sys.version, "platform": platform.platform(),
                            "versions": versions}
  smi = shutil.which("nvidia-smi")
  if smi:
    run = subprocess.run([smi], capture_output=True, text=True, timeout=30, check=False)
    result["nvidia_smi"] = run.stdout + run.stderr
  else:
    result["nvidia_smi"] = None
  _write(out, result)
  import jax  # pylint: disable=g-import-not-at-top
  result["devices"] = [{"kind": d.device_kind, "platform": d.platform, "id": d.id} for d in jax.devices()]
  result["backend"] = jax.default_backend()
  stats = jax.devices()[0].memory_stats() or {}
  result["memory_limit_bytes"] = stats.get("bytes_limit")
  result["workloads"] = {name: workload_configs(w) for name, w in spec.get("workloads", {}).items()}
  result["status"] = "ok"
  return result


def workload_configs(workload: dict) -> dict:
  """Our model config for a workload and the same settings in the original's names."""
  from trm_jax import bench  # pylint: disable=g-import-not-at-top
  config = load_config(workload["config"], workload.get("overrides", {}))
  model = bench.model_for(config, **workload["dims"])
  ours = dataclasses.asdict(model)
  original = {k: v for k, v in ours.items() if k not in OURS_ONLY and k != "loss_type"}
  optim = {k: config[k] for k in ("lr", "puzzle_emb_lr", "weight_decay", "puzzle_emb_weight_decay", "beta1",
                                  "beta2", "ema", "ema_rate")}
  return {"model": ours, "original_model": original, "loss_type": model.loss_type, "optim": optim}


# ---------------------------------------------------------------------------
# golden: every golden file through the chosen kernels.


def part_golden(spec: dict, out: pathlib.Path) -> dict:
  from trm_jax import golden  # pylint: disable=g-import-not-at-top
  kernels = spec.get("kernels", "pallas")
  result: dict[str, Any] = {"status": "running", "kernels": kernels, "files": {}}

  def check(path: str, impl: str) -> dict:
    start = time.perf_counter()
    try:
      report = golden.check_file(path, kernels=impl)
      row = {"ok": report.ok, "errors": report.errors, "limits": report.limits, "failures": report.failures,
             "line": report.line(pathlib.Path(path).name)}
    except Exception as e:  # pylint: disable=broad-except
      # A kernel that does not compile here is a result, written down.
      row = {"ok": False, "error": _error(e), "traceback": traceback.format_exc()[-4000:]}
    row["seconds"] = time.perf_counter() - start
    return row

  for path in spec["files"]:
    name = pathlib.Path(path).name
    row = check(path, kernels)
    if not row["ok"] and kernels != "xla" and spec.get("recheck_xla", True):
      # Tells a kernel problem from one of this device's numerics (or of the file).
      row["xla_recheck"] = check(path, "xla")
    result["files"][name] = row
    _write(out, result)
  result["ok"] = all(row["ok"] for row in result["files"].values())
  result["status"] = "ok"
  return result


# ---------------------------------------------------------------------------
# kernel_tests: tests/kernels under pytest, or the op checks without it.


def part_kernel_tests(spec: dict, out: pathlib.Path) -> dict:
  runner = spec.get("runner", "auto")
  if runner == "auto":
    runner = "pytest" if importlib.util.find_spec("pytest") else "plain"
  if runner == "pytest":
    return _pytest(spec)
  return _plain_op_checks(spec, out)


def _pytest(spec: dict) -> dict:
  import pytest  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    xml_path = pathlib.Path(tmp) / "junit.xml"
    paths = [str(REPO_ROOT / p) for p in spec.get("paths", ["tests/kernels"])]
    args = ["-o", "addopts=", "-q", "-p", "no:cacheprovider", f"--junitxml={xml_path}", "--rootdir", str(REPO_ROOT)]
    start = time.perf_counter()
    code = pytest.main(args + paths)
    seconds = time.perf_counter() - start
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if xml_path.is_file():
      for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        counts["tests"] += 1
        for tag, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
          node = case.find(tag)
          if node is None:
            continue
          counts[key] += 1
          if tag != "skipped":
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                           "message": (node.get("message") or "")[:1000]})
  passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
  return {"status": "ok", "runner": "pytest", "paths": spec.get("paths", ["tests/kernels"]), "exit_code": int(code),
          "ok": int(code) == 0, "passed": passed, **counts, "failed": failed, "seconds": seconds}


def _plain_op_checks(spec: dict, out: pathlib.Path) -> dict:
  """Each Pallas op against its jnp reference, forward and gradients, at the workloads' shapes."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from trm_jax import bench, bench_kernels  # pylint: disable=g-import-not-at-top
  result: dict[str, Any] = {"status": "running", "runner": "plain", "cases": []}
  tolerance = {"float32": 1e-4, "bfloat16": 3e-2}  # relative Frobenius error (float32 dots at "highest")

  def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

  for check in spec["checks"]:
    config = load_config(check["config"], check.get("overrides", {}))
    model = bench.model_for(config, **check["dims"])
    ops = list(check.get("ops", bench_kernels.OPS))
    for case in bench_kernels._cases(model, check["batch"], ops):  # pylint: disable=protected-access
      row = {"case": case.name, "shape": case.shape, "config": check["config"]}
      start = time.perf_counter()
      try:
        def vjp_of(impl: Callable, case=case):
          forward, arrays = bench_kernels.differentiable_forward(case, impl)
          out_shape = jax.eval_shape(forward, *arrays)
          cotangent = jax.random.normal(jax.random.key(7), out_shape.shape, jnp.float32).astype(out_shape.dtype)

          @jax.jit
          def fwd_bwd(arrays):
            value, pullback = jax.vjp(forward, *arrays)
            return value, pullback(cotangent)
          with jax.default_matmul_precision("highest"):
            value, grads = fwd_bwd(arrays)
          return [jnp.asarray(value, jnp.float32)] + [jnp.asarray(g, jnp.float32) for g in grads]

        ours, ref = vjp_of(case.kernel()), vjp_of(case.reference)
        errors = [relative(a, b) for a, b in zip(ours, ref)]
        limit = tolerance[case.shape["dtype"]]
        row.update({"forward_error": errors[0], "grad_errors": errors[1:], "tolerance": limit,
                    "ok": all(e <= limit for e in errors)})
      except Exception as e:  # pylint: disable=broad-except
        row.update({"ok": False, "error": _error(e)})
      row["seconds"] = time.perf_counter() - start
      result["cases"].append(row)
      _write(out, result)
  result["ok"] = all(row["ok"] for row in result["cases"])
  result["passed"] = sum(row["ok"] for row in result["cases"])
  result["failures"] = len(result["cases"]) - result["passed"]
  result["status"] = "ok"
  return result


# ---------------------------------------------------------------------------
# bench and max_batch: trm_jax.bench's whole-step timing.


def part_bench(spec: dict, out: pathlib.Path) -> dict:
  from trm_jax import bench  # pylint: disable=g-import-not-at-top
  config = load_config(spec["config"], spec.get("overrides", {}))
  result = bench.benchmark(config, batch_per_device=spec["batch_per_device"], num_steps=spec["steps"],
                           skip_eval=True, **spec["dims"])
  return {"status": "ok", "workload": spec.get("workload"), **result}


def part_max_batch(spec: dict, out: pathlib.Path) -> dict:
  """The largest per-device batch that fits (compiles only), then that batch timed, stepping down on OOM."""
  from trm_jax import bench, runs  # pylint: disable=g-import-not-at-top
  config = load_config(spec["config"], spec.get("overrides", {}))
  limit = int(spec.get("memory_limit_gb", 0) * 2**30) or None
  if limit is None:
    device_limit = bench.device_memory_limit()
    if device_limit is None:
      raise ValueError("this device reports no memory limit; give the part a memory_limit_gb")
    limit = int(0.97 * device_limit)
  granularity = int(spec.get("granularity", 8))
  result: dict[str, Any] = {"status": "running", "workload": spec.get("workload"), "memory_limit_bytes": limit,
                            "probes": []}

  def log(message: str) -> None:
    print(f"find_max_batch: {message}", file=sys.stderr, flush=True)
  batch, probes = bench.find_max_batch(config, limit, granularity=granularity, log=log, **spec["dims"])
  result.update(probes=probes, searched_batch_per_device=batch)
  _write(out, result)
  while True:
    try:
      timed = bench.benchmark(config, batch_per_device=batch, num_steps=spec["steps"], skip_eval=True,
                              **spec["dims"])
      break
    except Exception as e:  # pylint: disable=broad-except
      # The estimate ignores fragmentation: step down until it runs.
      if not runs.is_out_of_memory(e) or batch <= granularity:
        raise
      log(f"batch_per_device={batch} ran out of memory; trying {batch - granularity}")
      result.setdefault("out_of_memory_at", []).append(batch)
      batch -= granularity
  return {**result, **timed, "status": "ok", "batch_per_device": batch}


PARTS = {"env": part_env, "golden": part_golden, "kernel_tests": part_kernel_tests, "bench": part_bench,
         "max_batch": part_max_batch}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m trm_jax.verdict_parts", description=__doc__.split("\n\n")[0])
  parser.add_argument("kind", choices=sorted(PARTS))
  parser.add_argument("--spec", required=True, help="the part's settings, as JSON")
  parser.add_argument("--out", required=True, help="result JSON file")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  spec = json.loads(args.spec)
  start = time.perf_counter()
  try:
    result = PARTS[args.kind](spec, out)
  except Exception as e:  # pylint: disable=broad-except
    # Out of memory, a kernel that does not compile, a bad config: the result is the failure.
    previous = json.loads(out.read_text()) if out.is_file() else {}
    _write(out, {**previous, "status": "failed", "error": _error(e), "traceback": traceback.format_exc()[-6000:],
                 "spec": spec, "seconds": time.perf_counter() - start})
    return 1
  result.update(spec=spec, seconds=time.perf_counter() - start)
  _write(out, result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
