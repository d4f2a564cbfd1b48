"""Counts XLA compilations with jax's public monitoring API, to test that a step compiles once.

jax records ``/jax/core/compile/backend_compile_duration`` each time it builds
an executable for a jitted function (a hit in the persistent compilation cache
included), with the function's name (``jit(<name>)``) as ``fun_name``. A call
that retraces or recompiles for any reason (a new shape, dtype, weak type,
sharding or static argument) records it again, so the count fails a test that
a private cache size would.
"""

import collections
import contextlib
from typing import Iterator

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles() -> Iterator[collections.Counter]:
  """Yields a Counter of compilations by ``fun_name`` (e.g. ``"jit(train_step)"``) while open."""
  counts: collections.Counter = collections.Counter()

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs
    if event == BACKEND_COMPILE_EVENT:
      counts[kwargs.get("fun_name", "")] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
