"""Where a compiled step's time goes: a ``jax.profiler`` trace summarised by kind of XLA op.

``python -m trm_jax.bench ... --profile_dir=DIR`` traces a few train steps
after timing them and adds this summary to its JSON line: the share of op
time in matrix products, in copies and transposes (data movement the math
does not need), in reductions and in the other fusions (elementwise work),
the number of ops run per step, and the ops that took the most time. The
full trace stays in ``DIR`` for TensorBoard's profile plugin or Perfetto.

On a CPU the ops are XLA's thunks (YNNPACK matmuls appear as
``ynn_fusion``), on whichever host thread ran them: the ``tf_XLAEigen``
threads, or the calling thread, which with inline dispatch
(``trm_jax.cpu_runtime``) may run a whole step; on a GPU they are the kernels
on the device's ``XLA Ops`` line. Shares are of op time, not of wall time: on a
loaded machine the milliseconds grow but the shares say the same.
"""

from __future__ import annotations

import collections
import pathlib
import re
from typing import Any

# Names of XLA ops (fusions are named after their root or their kind) by kind of work.
_KINDS = (
    ("matmul", re.compile(r"^(ynn_fusion|dot|gemm|cublas|custom-call.*gemm|triton_gemm|convolution|.*_dot_)")),
    ("copy_transpose", re.compile(r"(copy|transpose)")),
    ("reduce", re.compile(r"^(reduce|.*reduce_fusion|.*_reduce)")),
)
_NOT_OPS = re.compile(r"^(ThunkExecutor|SlinkyThreadPool|Eigen|ThreadPool|\$)")


def kind_of(op_name: str) -> str:
  """``matmul``, ``copy_transpose``, ``reduce`` or ``elementwise_other`` for an XLA op name."""
  for kind, pattern in _KINDS:
    if pattern.search(op_name):
      return kind
  return "elementwise_other"


def _op_events(trace_file: pathlib.Path):
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  data = ProfileData.from_file(str(trace_file))
  device_lines = [line for plane in data.planes if plane.name.startswith("/device:")
                  for line in plane.lines if line.name == "XLA Ops"]
  if device_lines:
    lines, is_op = device_lines, lambda event: not _NOT_OPS.match(event.name)
  else:
    # Host threads also carry Python, dispatch and thread-pool events, and the
    # thunk executor's "end: <op>" markers: an XLA op is an event naming its HLO op.
    lines = [line for plane in data.planes if plane.name.startswith("/host:") for line in plane.lines]
    is_op = lambda event: any(name == "hlo_op" for name, _ in event.stats)
  for line in lines:
    for event in line.events:
      if is_op(event):
        yield event.name, event.duration_ns


def summarize(trace_dir: str | pathlib.Path, steps: int, top: int = 10) -> dict[str, Any]:
  """The newest trace in ``trace_dir`` (of ``steps`` steps) as shares by kind and the top ops."""
  files = sorted(pathlib.Path(trace_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise ValueError(f"{trace_dir}: no profiler trace (*.xplane.pb) was written")
  by_kind: collections.Counter = collections.Counter()
  by_op: collections.Counter = collections.Counter()
  count = 0
  for name, ns in _op_events(files[-1]):
    base = re.sub(r"[._]\d+$", "", name)
    by_kind[kind_of(base)] += ns
    by_op[name] += ns
    count += 1
  total = sum(by_kind.values())
  if not total:
    raise ValueError(f"{files[-1]}: the trace holds no XLA op events")
  return {
      "trace": str(files[-1]),
      "op_ms_per_step": total / 1e6 / steps,
      "ops_per_step": count / steps,
      "share": {k: by_kind.get(k, 0) / total for k in ("matmul", "copy_transpose", "reduce", "elementwise_other")},
      "top_ops_ms_per_step": {name: ns / 1e6 / steps for name, ns in by_op.most_common(top)},
  }
