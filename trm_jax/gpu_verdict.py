r"""The GPU verdict in one call: correctness of the compiled kernels, speed, and the original side by side.

  python -m trm_jax.gpu_verdict --out=DIR [--smoke] [--budget_s=500] [--parts=a,b] [--cap=PART=SECONDS]

Runs, in this order, each part in a child process with a deadline, and skips
what the time budget no longer allows (recorded as skipped, with the reason)
so that the whole stays inside one device call:

1. ``env``: versions, devices, ``nvidia-smi``, the workloads' model configs;
2. ``golden`` (every golden file through ``--config.model.kernels=pallas``,
   Triton-compiled on a GPU; files that fail are rechecked with ``xla``) and
   ``kernel_tests`` (``pytest tests/kernels``, compiled on a GPU; without
   pytest, each Pallas op against its reference, forward and gradients, at the
   workloads' shapes), concurrently, without preallocating device memory;
3. ``arc_xla`` (``remat="network"``, as configs/arc.py) and ``arc_pallas``
   (``remat="none"``): the ARC train step (D 512, S 900 + 16, 2 layers, H 3,
   L 4, bfloat16) at 192 per device, by ``trm_jax.bench``: steps/s, tokens/s,
   MFU, peak memory;
4. ``arc_original``: the original PyTorch code's own training step at the same
   config and batch (``trm_jax.torch_original_step``, ``torch.compile`` on), from
   the git-ignored copy ``--orig``; skipped where torch or the copy is absent;
5. ``sudoku_xla``, ``sudoku_pallas``, ``sudoku_original``: the same for the
   Sudoku mlp_t config (S 81 + 16, L 6) at 768 per device (the paper's one GPU);
6. ``arc_xla_max``, ``arc_pallas_max``: the largest per-device batch that fits,
   then timed (last: no target needs it).

Every part writes ``DIR/<part>.json`` (``DIR/logs/<part>.log`` holds its
output); ``DIR/summary.json`` has each part's status and time, the step rates
side by side, and the targets evaluated from the measured numbers as pass,
fail or not-measured: ``pallas`` >= 1.3x ``xla``, ours >= 1.5x the original's
step rate at the same batch, and model FLOP utilisation >= 50%. It is
rewritten after every part, so a call cut short still leaves it.

``--smoke`` runs the same parts at tiny shapes on a CPU, in minutes (the
golden check on the two non-model files, ``tests/kernels/test_common.py``,
``torch.compile`` off): it shows that the plumbing works, not a number.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

from trm_jax import errors

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The paper's settings; the ids are the ARC-AGI-1 x 1000 build's (docs/benchmarks.md); Sudoku has one.
WORKLOADS = {
    "arc": {"config": "arc", "batch_per_device": 192, "overrides": {"data_path": ""},
            "dims": {"seq_len": 900, "vocab_size": 12, "num_puzzle_identifiers": 876406}},
    "sudoku": {"config": "sudoku:mlp", "batch_per_device": 768, "overrides": {"data_path": ""},
               "dims": {"seq_len": 81, "vocab_size": 11, "num_puzzle_identifiers": 1}},
}
_TINY = {"data_path": "", "model.hidden_size": 32, "model.num_heads": 2, "model.L_layers": 1, "model.H_cycles": 1,
         "model.L_cycles": 1, "model.halt_max_steps": 2, "model.puzzle_emb_len": 4}
SMOKE_WORKLOADS = {
    "arc": {"config": "arc", "batch_per_device": 2, "overrides": _TINY,
            "dims": {"seq_len": 12, "vocab_size": 12, "num_puzzle_identifiers": 8}},
    "sudoku": {"config": "sudoku:mlp", "batch_per_device": 2, "overrides": _TINY,
               "dims": {"seq_len": 12, "vocab_size": 11, "num_puzzle_identifiers": 1}},
}
# Our two variants: xla with the config's remat (network for ARC), pallas without remat.
VARIANTS = {"xla": {"model.kernels": "xla"}, "pallas": {"model.kernels": "pallas", "model.remat": "none"}}
TARGETS = {"pallas_vs_xla": 1.3, "ours_vs_original": 1.5, "mfu": 0.5}

# Part -> (seconds it may take at most, seconds it needs to be worth starting).
CAPS = {"env": (60, 10), "correctness": (210, 60), "bench": (120, 45), "original": (240, 90),
        "max_batch": (150, 60)}


class UsageError(errors.UserError, ValueError):
  """A flag that names no part or kind."""


@dataclasses.dataclass
class Part:
  name: str
  kind: str  # a CAPS key
  argv: list[str] | None = None  # None: decided when it starts (needs earlier results)
  env: dict[str, str] = dataclasses.field(default_factory=dict)


class Verdict:
  """Runs the parts against one deadline and keeps ``summary.json`` current."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.out = pathlib.Path(args.out)
    (self.out / "logs").mkdir(parents=True, exist_ok=True)
    self.start = time.monotonic()
    self.deadline = self.start + args.budget_s
    self.caps = dict(CAPS)
    for item in args.cap:
      name, _, seconds = item.partition("=")
      if name not in self.caps or not seconds.replace(".", "", 1).isdigit():
        raise UsageError(f"--cap={item}: expected KIND=SECONDS with KIND one of {sorted(self.caps)}")
      self.caps[name] = (float(seconds), min(self.caps[name][1], float(seconds)))
    self.workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    self.summary: dict[str, Any] = {
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, "-m", "trm_jax.gpu_verdict"] + sys.argv[1:]),
        "commit": args.commit or _git_commit(), "smoke": args.smoke, "budget_s": args.budget_s,
        "workloads": self.workloads, "parts": {}}

  # --- running children.

  def _child_env(self, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env

  def remaining(self) -> float:
    return self.deadline - time.monotonic() - 3.0  # seconds kept for the summary

  def _record(self, name: str, status: str | None, **info) -> None:
    """Merges the orchestrator's view (``status`` overrides the child's when given) into the part's JSON."""
    path = self.out / f"{name}.json"
    result = {} if status == "skipped" else (_read(path) or {})
    if status is not None:
      result["status"] = status
    elif result.get("status") in (None, "running"):
      result["status"] = "failed"  # ended without writing its result (a crash)
    result["orchestrator"] = info
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    self.summary["parts"][name] = {"status": result["status"], **info}
    self.write_summary()

  def skip(self, part: Part, reason: str) -> None:
    self._record(part.name, "skipped", reason=reason)

  def run_group(self, parts: list[Part], kind: str) -> None:
    """Starts ``parts`` together; each gets the kind's deadline; late ones are killed (their group)."""
    cap, least = self.caps[kind]
    left = self.remaining()
    if left < least:
      for part in parts:
        self.skip(part, f"time budget: {left:.0f} s left, the part needs at least {least:.0f} s")
      return
    timeout = min(cap, left)
    running = []
    for part in parts:
      log = open(self.out / "logs" / f"{part.name}.log", "w", encoding="utf-8")  # pylint: disable=consider-using-with
      # Its own session: at the deadline its whole process group (compile workers too) is killed.
      proc = subprocess.Popen(part.argv, stdout=log, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                              cwd=REPO_ROOT, env=self._child_env(part.env), start_new_session=True)
      running.append((part, proc, log, time.monotonic()))
      print(f"gpu_verdict: {part.name} started (deadline {timeout:.0f} s)", file=sys.stderr, flush=True)
    group_deadline = time.monotonic() + timeout
    for part, proc, log, started in running:
      try:
        proc.wait(timeout=max(0.0, group_deadline - time.monotonic()))
        timed_out = False
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group, started above
        proc.wait()
        timed_out = True
      log.close()
      wall = time.monotonic() - started
      info = {"wall_s": round(wall, 1), "rc": proc.returncode, "log": f"logs/{part.name}.log"}
      if proc.returncode != 0:
        info["log_tail"] = _tail(self.out / "logs" / f"{part.name}.log")
      if timed_out:
        self._record(part.name, "timed_out", reason=f"killed at its deadline of {timeout:.0f} s", **info)
      else:
        self._record(part.name, None, **info)
      print(f"gpu_verdict: {part.name}: {self.summary['parts'][part.name]['status']} in {wall:.0f} s",
            file=sys.stderr, flush=True)

  # --- the plan.

  def jax_part(self, name: str, kind: str, spec: dict, env: dict[str, str] | None = None) -> Part:
    argv = [sys.executable, "-m", "trm_jax.verdict_parts", kind, "--spec", json.dumps(spec),
            "--out", str(self.out / f"{name}.json")]
    return Part(name, kind, argv, env or {})

  def bench_spec(self, workload: str, variant: str, steps: int) -> dict:
    w = self.workloads[workload]
    return {"workload": workload, "variant": variant, "config": w["config"], "dims": w["dims"],
            "overrides": {**w["overrides"], **VARIANTS[variant]}, "batch_per_device": w["batch_per_device"],
            "steps": steps}

  def original_part(self, workload: str) -> Part | str:
    """The torch child for ``workload``, or why it cannot start."""
    env = _read(self.out / "env.json") or {}
    configs = env.get("workloads", {}).get(workload)
    if not configs:
      return "the env part did not write the workload's config"
    spec = {"workload": workload, "orig": str(pathlib.Path(self.args.orig).resolve()),
            "model": configs["original_model"], "loss_type": configs["loss_type"], "optim": configs["optim"],
            "batch": self.workloads[workload]["batch_per_device"], "steps": self.args.torch_steps,
            "warmup": 2, "compile": bool(self.args.torch_compile)}
    spec_path = self.out / "logs" / f"{workload}_original_spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    argv = [self.args.torch_python, "-m", "trm_jax.torch_original_step", "--spec", str(spec_path),
            "--out", str(self.out / f"{workload}_original.json")]
    return Part(f"{workload}_original", "original", argv)

  def plan(self) -> list[tuple[str, list[Part | str]]]:
    a = self.args
    mem = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
    shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}  # several processes on one device
    files = sorted(str(p) for p in pathlib.Path(a.golden_dir).glob("*.npz"))
    if a.golden_files:
      files = [str(pathlib.Path(a.golden_dir) / f) for f in a.golden_files.split(",")]
    shards = [files[i::a.golden_workers] for i in range(a.golden_workers) if files[i::a.golden_workers]]
    correctness = [self.jax_part(f"golden_{i}", "golden", {"files": s, "kernels": "pallas"}, shared)
                   for i, s in enumerate(shards)]
    checks = [{"config": w["config"], "dims": w["dims"], "overrides": w["overrides"], "batch": 2}
              for w in self.workloads.values()]
    correctness.append(self.jax_part("kernel_tests", "kernel_tests",
                                     {"runner": a.kernel_runner, "paths": a.kernel_tests.split(","),
                                      "checks": checks}, shared))
    steps = a.steps
    plan: list[tuple[str, list[Part | str]]] = [
        ("env", [self.jax_part("env", "env", {"workloads": self.workloads})]),
        ("correctness", correctness)]
    for workload in self.workloads:
      for variant in VARIANTS:
        plan.append(("bench", [self.jax_part(f"{workload}_{variant}", "bench",
                                             self.bench_spec(workload, variant, steps), mem)]))
      plan.append(("original", [f"{workload}_original"]))
    for variant in VARIANTS:
      spec = {**self.bench_spec("arc", variant, steps), "memory_limit_gb": a.memory_limit_gb}
      plan.append(("max_batch", [self.jax_part(f"arc_{variant}_max", "max_batch", spec, mem)]))
    return plan

  def run(self) -> dict:
    plan = self.plan()
    wanted = set(self.args.parts.split(",")) if self.args.parts else None
    if wanted is not None:
      known = {group for group, _ in plan} | {p if isinstance(p, str) else p.name for _, ps in plan for p in ps} | {
          "original" if isinstance(p, str) else p.kind for _, ps in plan for p in ps}
      if wanted - known:
        raise UsageError(f"--parts: unknown {sorted(wanted - known)}; expected some of {sorted(known)}")
    for group, parts in plan:
      ready = []
      for part in parts:
        name = part if isinstance(part, str) else part.name
        kind = "original" if isinstance(part, str) else part.kind
        if wanted is not None and not wanted & {name, kind, group}:
          self.skip(Part(name, kind), "not in --parts")
          continue
        if isinstance(part, str):  # the torch child: its spec needs env.json
          built = self.original_part(name.rsplit("_", 1)[0])
          if isinstance(built, str):
            self.skip(Part(name, kind), built)
            continue
          part = built
        ready.append(part)
      if ready:
        self.run_group(ready, group)
    self.merge_golden()
    return self.finish()

  # --- results.

  def merge_golden(self) -> None:
    shards = sorted(self.out.glob("golden_*.json"))
    if not shards:
      return
    merged: dict[str, Any] = {"kernels": "pallas", "files": {}, "shards": {}}
    for path in shards:
      shard = _read(path) or {}
      merged["files"].update(shard.get("files", {}))
      merged["shards"][path.stem] = shard.get("status")
    complete = all(status == "ok" for status in merged["shards"].values())
    merged["ok"] = complete and all(row.get("ok") for row in merged["files"].values())
    merged["status"] = "ok" if complete else "incomplete"
    (self.out / "golden.json").write_text(json.dumps(merged, indent=1) + "\n")

  def finish(self) -> dict:
    results = {p.stem: _read(p) for p in self.out.glob("*.json") if p.name != "summary.json"}
    self.summary["comparison"] = comparison(results, self.workloads)
    self.summary["targets"] = evaluate_targets(results)
    golden = results.get("golden") or {}
    kernel_tests = results.get("kernel_tests") or {}
    self.summary["correctness"] = {
        "golden_ok": golden.get("ok"), "golden_files": {k: v.get("ok") for k, v in golden.get("files", {}).items()},
        "kernel_tests_ok": kernel_tests.get("ok"), "kernel_tests_runner": kernel_tests.get("runner"),
        "kernel_tests_passed": kernel_tests.get("passed"), "kernel_tests_failures": kernel_tests.get("failures")}
    self.summary["wall_s"] = round(time.monotonic() - self.start, 1)
    self.write_summary()
    return self.summary

  def write_summary(self) -> None:
    (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")


def _read(path: pathlib.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _tail(path: pathlib.Path, chars: int = 3000) -> str:
  try:
    return path.read_text(errors="replace")[-chars:]
  except OSError:
    return ""


def _git_commit() -> str | None:
  try:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return None


def _ok(result: dict | None) -> dict | None:
  return result if result and result.get("status") == "ok" else None


def comparison(results: dict[str, dict | None], workloads: dict) -> list[dict]:
  """One row per measured step: workload, implementation, batch, rate, MFU, peak memory."""
  rows = []
  for workload in workloads:
    for impl in ("xla", "pallas", "original", "xla_max", "pallas_max"):
      result = _ok(results.get(f"{workload}_{impl}"))
      if result is None:
        continue
      rows.append({"workload": workload, "impl": impl, "remat": result.get("remat"),
                   "batch_per_device": result.get("global_batch"),
                   "train_steps_per_s": result.get("train_steps_per_s"),
                   "train_tokens_per_s": result.get("train_tokens_per_s"), "train_mfu": result.get("train_mfu"),
                   "peak_memory_bytes": result.get("peak_memory_bytes"),
                   "compile": result.get("compile") if impl == "original" else None})
  return rows


def _target(name: str, workload: str, threshold: float, value: float | None, inputs: dict,
            missing: list[str], note: str = "") -> dict:
  row = {"target": name, "workload": workload, "threshold": threshold, "value": value, "inputs": inputs}
  if missing or value is None:
    row.update(status="not-measured", reason="missing: " + ", ".join(missing or ["a measured value"]))
  else:
    row["status"] = "pass" if value >= threshold else "fail"
  if note:
    row["note"] = note
  return row


def evaluate_targets(results: dict[str, dict | None]) -> list[dict]:
  """The issue's targets from the measured numbers: pass, fail or not-measured, with the inputs used."""
  rate = lambda name: (_ok(results.get(name)) or {}).get("train_steps_per_s")
  targets = []
  xla, pallas = rate("arc_xla"), rate("arc_pallas")
  missing = [n for n, v in (("arc_xla", xla), ("arc_pallas", pallas)) if v is None]
  targets.append(_target("pallas_vs_xla", "arc", TARGETS["pallas_vs_xla"], pallas / xla if not missing else None,
                         {"arc_pallas_steps_per_s": pallas, "arc_xla_steps_per_s": xla}, missing))
  for workload in ("arc", "sudoku"):
    ours = {impl: rate(f"{workload}_{impl}") for impl in VARIANTS}
    best_impl = max((i for i in ours if ours[i] is not None), key=lambda i: ours[i], default=None)
    original = _ok(results.get(f"{workload}_original")) or {}
    missing = ([] if best_impl else [f"{workload}_xla/{workload}_pallas"]) + (
        [] if original.get("train_steps_per_s") else [f"{workload}_original"])
    note = "" if original.get("compile", True) else (
        "the original ran eagerly: " + str(original.get("compile_error", "torch.compile off")))
    value = ours[best_impl] / original["train_steps_per_s"] if not missing else None
    targets.append(_target("ours_vs_original", workload, TARGETS["ours_vs_original"], value,
                           {"ours_impl": best_impl, "ours_steps_per_s": ours.get(best_impl) if best_impl else None,
                            "original_steps_per_s": original.get("train_steps_per_s"),
                            "ratio_by_impl": {i: (v / original["train_steps_per_s"]
                                                  if v and original.get("train_steps_per_s") else None)
                                              for i, v in ours.items()}}, missing, note))
  mfus = {name: (_ok(results.get(name)) or {}).get("train_mfu")
          for name in ("arc_xla", "arc_pallas", "arc_xla_max", "arc_pallas_max")}
  measured = {k: v for k, v in mfus.items() if v is not None}
  best = max(measured, key=measured.get) if measured else None
  targets.append(_target("mfu", "arc", TARGETS["mfu"], measured.get(best) if best else None,
                         {"best_run": best, "mfu_by_run": mfus}, [] if best else ["a train_mfu (a known device peak)"]))
  return targets


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m trm_jax.gpu_verdict", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="directory for the JSON results (created)")
  p.add_argument("--smoke", action="store_true", help="tiny shapes, on a CPU (every part, torch.compile off)")
  p.add_argument("--budget_s", type=float, default=500.0, help="seconds the whole may take (default 500)")
  p.add_argument("--parts", default="", help="only these parts (names as in DIR/summary.json, or a kind: golden)")
  p.add_argument("--cap", action="append", default=[], help=f"KIND=SECONDS, a part kind's deadline: {sorted(CAPS)}")
  p.add_argument("--orig", default=str(REPO_ROOT / ".orig"), help="copy of the original's repository")
  p.add_argument("--torch_python", default=sys.executable, help="Python that has torch (default: this one)")
  p.add_argument("--torch_compile", type=int, default=None, help="torch.compile the original (default 1; smoke 0)")
  p.add_argument("--golden_dir", default="", help="golden files (default: tests/golden, shipped in the repository)")
  p.add_argument("--golden_files", default="", help="only these files of --golden_dir, comma-separated")
  p.add_argument("--golden_workers", type=int, default=0, help="golden processes at once (default 4; smoke 1)")
  p.add_argument("--kernel_runner", choices=("auto", "pytest", "plain"), default="auto",
                 help="pytest tests/kernels, or the plain op checks (auto: pytest if importable)")
  p.add_argument("--kernel_tests", default="", help="pytest paths (default tests/kernels; smoke test_common.py)")
  p.add_argument("--steps", type=int, default=0, help="timed train steps of ours (default 10; smoke 2)")
  p.add_argument("--torch_steps", type=int, default=0, help="timed steps of the original (default 10; smoke 2)")
  p.add_argument("--memory_limit_gb", type=float, default=0.0,
                 help="memory the batch search may fill (default: 97%% of the device's; smoke 0.002)")
  p.add_argument("--commit", default="", help="the code's commit, when the checkout has no .git")
  return p


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  smoke = args.smoke
  args.torch_compile = (0 if smoke else 1) if args.torch_compile is None else args.torch_compile
  args.golden_workers = args.golden_workers or (1 if smoke else 4)
  args.kernel_tests = args.kernel_tests or ("tests/kernels/test_common.py" if smoke else "tests/kernels")
  args.steps = args.steps or (2 if smoke else 10)
  args.torch_steps = args.torch_steps or (2 if smoke else 10)
  args.memory_limit_gb = args.memory_limit_gb or (0.002 if smoke else 0.0)
  if smoke and not args.golden_files:
    args.golden_files = "stablemax_ce.npz,adam_atan2.npz"
  if not args.golden_dir:
    args.golden_dir = str(REPO_ROOT / "tests" / "golden")
  if args.golden_workers < 1 or args.steps < 1 or args.torch_steps < 1 or args.budget_s <= 0:
    print("error: --golden_workers, --steps, --torch_steps and --budget_s must be positive", file=sys.stderr)
    return 2
  if not pathlib.Path(args.golden_dir).is_dir():
    print(f"error: --golden_dir={args.golden_dir}: no such directory", file=sys.stderr)
    return 2
  try:
    summary = Verdict(args).run()
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"targets": [{k: t[k] for k in ("target", "workload", "status", "value")}
                                for t in summary["targets"]],
                    "parts": {k: v["status"] for k, v in summary["parts"].items()}}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
