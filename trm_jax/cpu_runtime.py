"""How a process runs compiled steps on a CPU: inline dispatch, freed memory kept mapped.

XLA:CPU allocates a compiled step's temporary buffer afresh at every call
(about 680 MB for the Sudoku mlp_t train step of issue #17) and frees it
after. With jax's default asynchronous dispatch the call runs on one of its
threads, whose glibc arena hands any block above 64 MB to ``mmap`` and back
to the kernel at ``free``: the next step page-faults the whole buffer in
again (about 165,000 minor faults, a third of a CPU second, per step at
those settings). ``configure(True)``

- turns off asynchronous dispatch on the CPU (``jax_cpu_enable_async_dispatch``,
  read when jax creates its CPU client, so before the first computation), so
  that a single-device step runs, and allocates, on the calling thread, in
  glibc's main arena;
- tells glibc's malloc to serve large blocks from that arena's heap rather
  than ``mmap`` (``M_MMAP_MAX`` 0) and to keep up to 2 GiB of freed memory at
  its top (``M_TRIM_THRESHOLD``), so the buffer freed by one step is the one
  the next step gets, already mapped.

Numbers are unchanged (it is where memory comes from and which thread
launches the step). On a GPU neither matters and nothing is changed.
Multi-device CPU computations still dispatch asynchronously (jax's flag only
covers single-device ones). Glibc only: elsewhere the malloc part is skipped.
"""

from __future__ import annotations

import ctypes
import platform

import jax

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes an int: the most it can keep
_ASYNC_FLAG = "jax_cpu_enable_async_dispatch"

_applied: dict[str, bool] = {}


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a jax without it: assume the worst
    return True


def _keep_freed_memory() -> bool:
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
  except (OSError, AttributeError):
    return False


def configure(enabled: bool) -> dict[str, bool]:
  """Applies the settings above when ``enabled`` and the default backend is a CPU.

  Call it before the first computation: ``runs.setup`` does, so every entry
  point of ``launch.py`` and ``train_and_evaluate`` in a fresh process, and
  ``trm_jax.bench`` does at its start. Once jax's CPU client exists with
  asynchronous dispatch it applies nothing. Returns what took effect:
  ``inline_dispatch`` and ``keep_freed_memory``. Idempotent.
  """
  if not enabled:
    return {"inline_dispatch": False, "keep_freed_memory": False}
  if _applied:
    return dict(_applied)
  if not _backends_initialized():
    jax.config.update(_ASYNC_FLAG, False)
  if jax.default_backend() != "cpu":
    return {"inline_dispatch": False, "keep_freed_memory": False}
  # The client exists now, with what the flag said when it was made.
  inline = not jax.config.values.get(_ASYNC_FLAG, True)
  # Without inline dispatch the step allocates on jax's thread, in an arena
  # that maps large blocks whatever mallopt says: nothing to gain.
  _applied.update(inline_dispatch=inline, keep_freed_memory=inline and _keep_freed_memory())
  return dict(_applied)
