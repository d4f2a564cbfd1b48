r"""Times each hot-path op alone, ``xla`` against ``pallas``, at a config's shapes.

  python -m trm_jax.bench_kernels --config=configs/arc.py --batch_per_device=192 \
      [--ops=attention,rms_norm,swiglu] [--sweep=none|small|full] [--output=FILE]

The shapes are the ones the model's layers see for that config and
per-device batch: attention ``[B, S+P, H, K]`` (with the RoPE tables when
``pos_encodings="rope"``), the residual RMSNorm and the channel SwiGLU over
``[B, S+P, D]``, and for ``mlp_t`` the SwiGLU and RMSNorm over positions
(``[B, D, S+P]``). Each case is timed forward alone and forward plus backward
(one ``jax.vjp`` with a fixed cotangent), for the plain-jnp reference (what
``model.kernels="xla"`` runs) and the Pallas kernel.

The Pallas kernels run with the config's launch parameters
(``config.model.kernel_params.<case>``, one ``BlockSizes`` dataclass per case:
``attention``, ``rms_norm``, ``swiglu``, ``rms_norm_mlp_t``, ``swiglu_mlp_t``).
``--sweep`` also times them over a grid of tile sizes and Triton launch
parameters, starting from the config's: forward parameters first (by forward
time), then the backward ones with the best forward ones fixed (by forward plus
backward time); the config's own values are a candidate of each phase, so a
sweep never picks something slower than what it measured them at. Each
candidate's forward output is checked against the reference; a candidate that
fails to compile (shared memory, registers) or disagrees is reported and never
chosen. Every result is one JSON line (stdout, and ``--output`` if given); the
last line, ``{"summary": ...}``, has per case the reference and config-kernel
times, the best parameters found and their speedup, and ``config_overrides``:
the best parameters of every case as the ``--config.model.kernel_params.*``
flags to add to the training command (also printed to stderr as one line).
Sequence lengths differ per task (S + P = 97 for Sudoku, 916 for ARC and
mazes), so a sweep is run, and its overrides kept, per task config.

On a CPU the kernels run in Pallas interpret mode: the tool works (and is
tested) there, but its numbers only mean something on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

FLAGS = flags.FLAGS

OPS = ("attention", "rms_norm", "swiglu")
# Forward-output agreement a candidate must reach (relative Frobenius error).
TOLERANCE = {"float32": 1e-2, "bfloat16": 3e-2, "float16": 1e-2}


@dataclasses.dataclass
class Case:
  """One op at one shape: its inputs, the two implementations and its FLOPs."""
  name: str               # e.g. "attention", "swiglu_mlp_t"
  op: str                 # the kernels/ op: attention, rms_norm or swiglu
  args: tuple             # positional inputs (arrays or None)
  reference: Callable     # (*args) -> out
  pallas: Callable        # (*args, block_sizes=...) -> out
  block_sizes: Any        # the config's launch parameters: model.kernel_params.<name>, a kernels BlockSizes
  fwd_flops: float        # matmul FLOPs of the forward pass (0 for the norm)
  fwd_bytes: float        # bytes the forward pass must move at least
  shape: dict[str, Any]
  num_diff: int = 0       # leading args differentiated, as in the model (0: all); the rest are constants

  def kernel(self, params: dict[str, Any] | None = None) -> Callable:
    """The Pallas op with the config's launch parameters, ``params`` replacing some (checked: a bad
    value raises here)."""
    return functools.partial(self.pallas, block_sizes=dataclasses.replace(self.block_sizes, **(params or {})))


def _cases(model, batch: int, ops: list[str]) -> list[Case]:
  from trm_jax.kernels import attention as attention_lib, rms_norm as rms_norm_lib, swiglu as swiglu_lib  # pylint: disable=g-import-not-at-top
  from trm_jax.models import layers  # pylint: disable=g-import-not-at-top
  dtype = jnp.dtype(model.forward_dtype)
  length, dim = model.num_positions, model.hidden_size
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda shape, dt=dtype: jax.random.normal(next(keys), shape, jnp.float32).astype(dt)
  cases = []
  if "attention" in ops and not model.mlp_t:
    heads, head_dim = model.num_heads, model.head_dim
    shape = (batch, length, heads, head_dim)
    q, k, v = normal(shape), normal(shape), normal(shape)
    cos = sin = None
    if model.pos_encodings == "rope":
      cos, sin = layers.rope_tables(length, head_dim, model.rope_theta)
    cases.append(Case("attention", "attention", (q, k, v, cos, sin), attention_lib.attention_reference,
                      attention_lib.attention, model.kernel_params.attention,
                      4.0 * batch * heads * length * length * head_dim,
                      4.0 * q.size * dtype.itemsize, {"B": batch, "S": length, "H": heads, "K": head_dim,
                                                      "rope": cos is not None, "dtype": dtype.name},
                      num_diff=3))  # the RoPE tables are constants in the model
  widths = [("", (batch, length, dim), dim)]
  if model.mlp_t:
    widths.append(("_mlp_t", (batch, dim, length), length))
  eps = model.rms_norm_eps
  for suffix, shape, width in widths:
    if "rms_norm" in ops:
      x, residual = normal(shape), normal(shape)
      cases.append(Case("rms_norm" + suffix, "rms_norm", (x, residual),
                        functools.partial(rms_norm_lib.residual_rms_norm_reference, eps=eps),
                        functools.partial(rms_norm_lib.residual_rms_norm, eps=eps),
                        getattr(model.kernel_params, "rms_norm" + suffix), 0.0,
                        3.0 * x.size * dtype.itemsize, {"shape": list(shape), "dtype": dtype.name}))
    if "swiglu" in ops:
      inter = layers.swiglu_intermediate_size(width, model.expansion)
      x = normal(shape)
      w_gate_up = normal((width, 2 * inter), jnp.float32) * width ** -0.5
      w_down = normal((inter, width), jnp.float32) * inter ** -0.5
      rows = x.size // width
      cases.append(Case("swiglu" + suffix, "swiglu", (x, w_gate_up, w_down), swiglu_lib.swiglu_reference,
                        swiglu_lib.swiglu, getattr(model.kernel_params, "swiglu" + suffix), 6.0 * rows * width * inter,
                        2.0 * x.size * dtype.itemsize + 3.0 * width * inter * dtype.itemsize,
                        {"shape": list(shape), "intermediate": inter, "dtype": dtype.name}))
  return cases


# Sweep grids: (phase, timed part, {param: values}). The forward phase picks
# the parameters both passes share; the backward phase keeps them fixed.
_GRIDS = {
    "small": {
        "attention": [("fwd", "fwd", {"block_q": [64, 128], "block_k": [32, 64], "num_warps": [4, 8],
                                      "num_stages": [2, 3]}),
                      ("bwd", "fwd_bwd", {"block_q_bwd": [32, 64], "block_k_bwd": [64, 128],
                                          "num_warps_bwd": [4, 8], "num_stages_bwd": [1, 2]})],
        "rms_norm": [("fwd_bwd", "fwd_bwd", {"block_rows": [1, 4, 16], "num_warps": [2, 4, 8]})],
        "swiglu": [("fwd", "fwd", {"block_rows": [64, 128], "block_inter": [64, 128], "block_width": [32, 64],
                                   "num_warps": [4, 8]}),
                   ("bwd", "fwd_bwd", {"num_warps_bwd": [4, 8], "num_stages_bwd": [2, 3],
                                       "matmul_impl": ["xla", "pallas"]})],
    },
    "full": {
        "attention": [("fwd", "fwd", {"block_q": [32, 64, 128], "block_k": [32, 64, 128], "num_warps": [4, 8],
                                      "num_stages": [2, 3, 4]}),
                      ("bwd", "fwd_bwd", {"block_q_bwd": [32, 64, 128], "block_k_bwd": [32, 64, 128],
                                          "num_warps_bwd": [4, 8], "num_stages_bwd": [1, 2, 3]})],
        "rms_norm": [("fwd_bwd", "fwd_bwd", {"block_rows": [1, 2, 4, 8, 16, 32], "num_warps": [1, 2, 4, 8],
                                             "num_stages": [1, 2]})],
        "swiglu": [("fwd", "fwd", {"block_rows": [32, 64, 128], "block_inter": [32, 64, 128],
                                   "block_width": [32, 64], "num_warps": [4, 8], "num_stages": [2, 3]}),
                   ("bwd", "fwd_bwd", {"num_warps_bwd": [2, 4, 8], "num_stages_bwd": [1, 2, 3],
                                       "matmul_impl": ["xla", "pallas"]})],
    },
}


def grid(sweep: str, op: str) -> list[tuple[str, str, list[dict[str, Any]]]]:
  """The sweep's phases for ``op``: (phase, timed part, candidate parameter dicts)."""
  if sweep == "none":
    return []
  phases = []
  for phase, part, axes in _GRIDS[sweep][op]:
    names = list(axes)
    candidates = [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]
    phases.append((phase, part, candidates))
  return phases


def _best_time(fn, iters: int, repeats: int = 3) -> tuple[float, Any]:
  """(seconds per call: the best of ``repeats`` runs of ``iters`` calls, the first call's result)."""
  first = jax.block_until_ready(fn())  # compiles and warms up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn()
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - start) / iters)
  return best, first


def differentiable_forward(case: Case, impl: Callable) -> tuple[Callable, list[jax.Array]]:
  """``(forward, arrays)``: ``impl`` on the case's arguments as a function of the
  differentiable ones only (the first ``num_diff`` that are not None), and those."""
  args = case.args
  diff = [i for i, a in enumerate(args[:case.num_diff or len(args)]) if a is not None]

  def forward(*arrays):
    full = list(args)
    for i, a in zip(diff, arrays):
      full[i] = a
    return impl(*full)

  return forward, [args[i] for i in diff]


def _measure(case: Case, impl: Callable, part: str, iters: int) -> tuple[float, jax.Array]:
  """(seconds per call of the forward (``fwd``) or forward plus backward
  (``fwd_bwd``), the forward output)."""
  args = case.args
  forward, arrays = differentiable_forward(case, impl)
  if part == "fwd":
    fn = jax.jit(forward)
    return _best_time(lambda: fn(*arrays), iters)
  cotangent = jax.random.normal(jax.random.key(1), jax.eval_shape(forward, *arrays).shape,
                                jnp.float32).astype(args[0].dtype)

  @jax.jit
  def fwd_bwd(arrays, cotangent):
    out, vjp = jax.vjp(forward, *arrays)
    return out, vjp(cotangent)
  seconds, (out, _) = _best_time(lambda: fwd_bwd(arrays, cotangent), iters)
  return seconds, out


@jax.jit
def _relative_error_fn(out, ref):
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  return jnp.linalg.norm(out - ref) / jnp.maximum(jnp.linalg.norm(ref), 1e-30)


def _record(case: Case, impl: str, params: dict, part: str, seconds: float) -> dict:
  flops = case.fwd_flops * (3.0 if part == "fwd_bwd" else 1.0)  # backward = 2x forward, as bench.py
  row = {"case": case.name, "impl": impl, "params": params, "part": part, "ms": seconds * 1e3}
  if flops:
    row["tflops_per_s"] = flops / seconds / 1e12
  if part == "fwd" and case.fwd_bytes:
    row["fwd_gb_per_s_lower_bound"] = case.fwd_bytes / seconds / 1e9
  return row


def run(model, batch: int, *, ops: list[str], sweep: str = "none", max_candidates: int = 0,
        iters: int = 10, emit: Callable[[dict], None] = lambda row: None) -> dict:
  """Times every case; returns the summary (also emitted as the last row)."""
  summary = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch_per_device": batch,
             "cases": {}}
  best = {}  # case name -> its best BlockSizes
  for case in _cases(model, batch, ops):
    info = {"shape": case.shape, "block_sizes": case.block_sizes.to_dict()}
    emit({"case": case.name, "shape": case.shape})
    outputs = {}
    for impl_name, impl in (("xla", case.reference), ("pallas", case.kernel())):
      for part in ("fwd", "fwd_bwd"):
        seconds, outputs[impl_name] = _measure(case, impl, part, iters)
        emit(_record(case, impl_name, {}, part, seconds))
        info[f"{impl_name}_{part}_ms"] = seconds * 1e3
    reference_out = outputs["xla"]
    info["pallas_default_error"] = float(_relative_error_fn(outputs["pallas"], reference_out))
    info["default_speedup_fwd_bwd"] = info["xla_fwd_bwd_ms"] / info["pallas_fwd_bwd_ms"]
    chosen: dict[str, Any] = {}
    tolerance = TOLERANCE[case.shape["dtype"]]
    for phase, part, candidates in grid(sweep, case.op):
      if max_candidates:
        candidates = candidates[:max_candidates]
      phase_best = None
      for candidate in [{}] + candidates:  # {}: the config's (or the earlier phases') values
        params = {**chosen, **candidate}
        row = {"case": case.name, "impl": "pallas", "phase": phase, "params": params, "part": part}
        try:
          seconds, out = _measure(case, case.kernel(params), part, iters)
          error = float(_relative_error_fn(out, reference_out))
        except Exception as e:  # pylint: disable=broad-except
          # Too much shared memory, too many registers, an invalid tile: skip it.
          row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
          emit(row)
          continue
        row = {**_record(case, "pallas", params, part, seconds), "phase": phase, "error_vs_reference": error}
        if not error <= tolerance:
          row["rejected"] = f"forward error {error:.3g} > {tolerance:g}"
        elif phase_best is None or seconds < phase_best[0]:
          phase_best = (seconds, candidate)
        emit(row)
      if phase_best is not None:
        chosen.update(phase_best[1])
    if sweep != "none":
      best_ms = info["pallas_fwd_bwd_ms"]
      if chosen:  # the final choice, timed forward plus backward
        best_ms = _measure(case, case.kernel(chosen), "fwd_bwd", iters)[0] * 1e3
      best[case.name] = dataclasses.replace(case.block_sizes, **chosen)
      info.update({"best_params": chosen, "best_block_sizes": best[case.name].to_dict(),
                   "best_fwd_bwd_ms": best_ms, "best_speedup_fwd_bwd": info["xla_fwd_bwd_ms"] / best_ms})
    summary["cases"][case.name] = info
  if sweep != "none":
    summary["config_overrides"] = config_overrides(model.kernel_params, best)
  emit({"summary": summary})
  return summary


def config_overrides(kernel_params, best: dict[str, Any]) -> list[str]:
  """The ``--config.model.kernel_params.*`` flags that give ``kernel_params`` with each swept
  case's best parameters: every value that differs from the defaults (so the flags reproduce
  what was measured, also where the config already overrode a default)."""
  return dataclasses.replace(kernel_params, **best).overrides()


def _define_flags():
  """Flags exist only when this runs as a program (bench.py has flags of the same names)."""
  config_flags.DEFINE_config_file("config", "configs/arc.py", "Config file (configs/x.py[:arg]).", lock_config=True)
  flags.DEFINE_integer("batch_per_device", 0, "Examples per device (0: global_batch_size / devices).")
  flags.DEFINE_list("ops", ["attention", "rms_norm", "swiglu"], "Ops to time (those the config uses).")
  flags.DEFINE_enum("sweep", "none", ["none", "small", "full"], "Sweep the Pallas launch parameters.")
  flags.DEFINE_integer("max_candidates", 0, "Stop each sweep phase after this many candidates (0: all).")
  flags.DEFINE_integer("iters", 10, "Timed calls per measurement (the best of 3 repeats is kept).")
  flags.DEFINE_integer("seq_len", 0, "Sequence length when data_path is absent (0: 900, as ARC and mazes).")
  flags.DEFINE_string("output", "", "Also append the JSON lines to this file.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from trm_jax import bench, errors  # pylint: disable=g-import-not-at-top
  unknown = [op for op in FLAGS.ops if op not in OPS]
  if unknown:
    print(f"error: --ops: unknown {unknown}; expected some of {list(OPS)}", file=sys.stderr)
    sys.exit(2)
  config = FLAGS.config
  try:
    model = bench.model_for(config, seq_len=FLAGS.seq_len)
  except (errors.UserError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  batch = FLAGS.batch_per_device or max(1, config.global_batch_size // jax.device_count())
  out_file = open(FLAGS.output, "a", encoding="utf-8") if FLAGS.output else None  # pylint: disable=consider-using-with

  def emit(row):
    line = json.dumps(row)
    print(line, flush=True)
    if out_file:
      out_file.write(line + "\n")
      out_file.flush()
  try:
    summary = run(model, batch, ops=FLAGS.ops, sweep=FLAGS.sweep, max_candidates=FLAGS.max_candidates,
                  iters=FLAGS.iters, emit=emit)
  finally:
    if out_file:
      out_file.close()
  if "config_overrides" in summary:
    # stdout holds only JSON lines; the one line to paste goes to stderr.
    flags_line = " ".join(summary["config_overrides"]) or "(none: the default parameters were the fastest measured)"
    print(f"best launch parameters, as config overrides: {flags_line}", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
