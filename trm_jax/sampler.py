"""The train batch plan (SPEC §8): the original's sampler, its random draws replayed exactly.

For pass ``p`` and the ``k``-th set of a split (of ``n`` sets), the group order
and the puzzle picks come from ``Generator(Philox(seed=seed + p * n + k + 1))``
as in the original's ``PuzzleDataset._iter_train``: ``epochs_per_iter``
permutations of the groups, then one ``integers(group_start, group_end)`` per
visited group, packed greedily into global batches (the pass's last incomplete
batch is dropped). The per-group ``integers`` calls are replayed vectorised on
a copy of the Philox stream (``sequential_integers``), checked against numpy
itself once per process. Within a puzzle, the examples come from a generator
seeded by ``(seed, counter, batch, EXAMPLE_CHOICE_TAG)``, the same on every
process (see ``trm_jax.data`` for why this differs from the original).

``TrainSampler`` is pure numpy and picklable, so grain worker processes can
hold it; ``trm_jax.data`` turns its plans into read requests.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings

import numpy as np

from trm_jax import dataset_format

# Tag mixed into the seed of the within-puzzle example choice, so that it is not
# the same stream as anything else seeded with (seed, counter, batch).
EXAMPLE_CHOICE_TAG = 0x74726D

_MASK32 = np.uint64(0xFFFFFFFF)


class _Uint32Stream:
  """The ``next_uint32`` values a Philox bit generator would produce, from a copy."""

  def __init__(self, bit_generator: np.random.Philox):
    state = bit_generator.state
    self._scratch = np.random.Philox()
    self._scratch.state = state
    self._buffered = bool(state["has_uint32"])
    first = [np.uint64(state["uinteger"])] if self._buffered else []
    self._values = np.asarray(first, np.uint64)  # Stream values [self._base, ...).
    self._base = 0

  def take(self, pos: int, count: int) -> np.ndarray:
    """Stream values ``[pos, pos + count)``; ``pos`` never goes back before an earlier ``pos``."""
    if pos < self._base:
      raise AssertionError("_Uint32Stream read backwards")
    end = self._base + self._values.shape[0]
    if pos + count > end:
      raw = self._scratch.random_raw((pos + count - end + 1) // 2 + 64)
      # numpy's Philox next_uint32: low half of a 64-bit draw first, then high.
      halves = np.stack([raw & _MASK32, raw >> np.uint64(32)], axis=1).reshape(-1)
      self._values = np.concatenate([self._values[pos - self._base:], halves])
      self._base = pos
    return self._values[pos - self._base:pos - self._base + count]

  def value(self, pos: int) -> int:
    return int(self.take(pos, 1)[0])

  def advance(self, bit_generator: np.random.Philox, consumed: int) -> None:
    """Moves ``bit_generator`` past the first ``consumed`` values of the stream."""
    if consumed == 0:
      return
    from_raw = consumed - 1 if self._buffered else consumed
    raw_used = (from_raw + 1) // 2
    if raw_used:
      bit_generator.random_raw(raw_used)
    state = bit_generator.state
    if from_raw % 2:
      state["has_uint32"] = 1
      state["uinteger"] = self.value(consumed)  # The unused high half.
    else:
      state["has_uint32"] = 0
      if raw_used:  # numpy leaves the last high half there, consumed; so do we.
        state["uinteger"] = self.value(consumed - 1)
    bit_generator.state = state


def _fast_sequential_integers(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
  """``[rng.integers(l, h) for l, h in zip(low, high)]`` without the Python loop.

  numpy's ``Generator.integers(low, high)`` (int64, spans below 2**32) draws
  nothing for a span of 1 and otherwise uses Lemire's method on ``next_uint32``
  values: ``m = u * span``, rejected while ``m mod 2**32 < (2**32 - span) % span``,
  result ``low + m >> 32``. This replays it on a copy of the bit generator and
  then advances the real one past exactly the values used.
  """
  out = low.copy()
  span = high - low
  draw_at = np.flatnonzero(span > 1)
  if draw_at.shape[0] == 0:
    return out
  stream = _Uint32Stream(rng.bit_generator)
  span_u = span[draw_at].astype(np.uint64)
  threshold = (np.uint64(1 << 32) - span_u) % span_u
  pos = k = 0
  total = draw_at.shape[0]
  while k < total:
    m = min(total - k, 1 << 16)
    u = stream.take(pos, m)
    prod = u * span_u[k:k + m]
    bad = (prod & _MASK32) < threshold[k:k + m]
    good = m if not bad.any() else int(np.argmax(bad))
    out[draw_at[k:k + good]] += (prod[:good] >> np.uint64(32)).astype(np.int64)
    pos += good
    k += good
    if good < m:  # A rejection: redraw this one until accepted.
      sp, th = int(span_u[k]), int(threshold[k])
      pos += 1
      while True:
        p = stream.value(pos) * sp
        pos += 1
        if p & 0xFFFFFFFF >= th:
          break
      out[draw_at[k]] += p >> 32
      k += 1
  stream.advance(rng.bit_generator, pos)
  return out


def _scalar_sequential_integers(rng, low, high):
  return np.asarray([rng.integers(lo, hi) for lo, hi in zip(low.tolist(), high.tolist())], np.int64)


@functools.cache
def fast_integers_match_numpy() -> bool:
  """Checks the vectorised replay against numpy itself (once per process)."""
  check = np.random.default_rng(7)
  spans = np.concatenate([check.integers(1, 5, 300), check.integers(1, 2000, 300),
                          check.integers(2**31, 2**32 - 1, 300)])  # The last force rejections.
  check.shuffle(spans)
  low = check.integers(0, 1000, spans.shape[0])
  high = low + spans
  for warmup in (0, 1):  # With and without a buffered 32-bit half in the state.
    a = np.random.Generator(np.random.Philox(seed=11))
    b = np.random.Generator(np.random.Philox(seed=11))
    for g in (a, b):
      g.integers(0, 3, size=warmup)
    want = _scalar_sequential_integers(a, low, high)
    got = _fast_sequential_integers(b, low, high)
    if not np.array_equal(want, got) or a.integers(0, 1000, 5).tolist() != b.integers(0, 1000, 5).tolist():
      return False
  return True


def sequential_integers(rng: np.random.Generator, low: np.ndarray, high: np.ndarray) -> np.ndarray:
  """Exactly ``rng.integers(low[i], high[i])`` for i = 0, 1, ... (int64 results)."""
  low = np.asarray(low, np.int64)
  high = np.asarray(high, np.int64)
  if low.shape[0] and (high - low).max() < (1 << 32) - 1 and fast_integers_match_numpy():
    return _fast_sequential_integers(rng, low, high)
  if low.shape[0] and not fast_integers_match_numpy():
    warnings.warn("trm_jax.data: numpy's Generator.integers changed; using the slow exact sampler")
  return _scalar_sequential_integers(rng, low, high)


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
  """The full batches of one set in one pass."""
  set_name: str
  counter: int  # The original's `_iters` for this set and pass: its rng seed is seed + counter.
  picks: np.ndarray  # [N] int32 puzzle picked for each visited group (only those in full batches).
  starts: np.ndarray  # [num_batches + 1] int64 boundaries of the batches in `picks`.

  @property
  def num_batches(self) -> int:
    return self.starts.shape[0] - 1


_PLAN_CHUNK = 1 << 20  # Group positions per vectorised chunk (bounds temporary memory).


def plan_segment(s: dataset_format.SetIndex, set_name: str, counter: int, seed: int, epochs_per_iter: int,
                  global_batch_size: int) -> SegmentPlan:
  """The original's group order, puzzle picks and batch packing for one set and pass."""
  num_groups = s.num_groups
  rng = np.random.Generator(np.random.Philox(seed=seed + counter))
  order = np.empty(epochs_per_iter * num_groups, np.int32)
  for e in range(epochs_per_iter):
    order[e * num_groups:(e + 1) * num_groups] = rng.permutation(num_groups)
  picks = np.empty(order.shape[0], np.int32)
  gidx, pidx = s.group_indices.astype(np.int64), s.puzzle_indices.astype(np.int64)
  for c in range(0, order.shape[0], _PLAN_CHUNK):
    o = order[c:c + _PLAN_CHUNK]
    picks[c:c + _PLAN_CHUNK] = sequential_integers(rng, gidx[o], gidx[o + 1])
  del order
  cum = np.zeros(picks.shape[0] + 1, np.int64)
  np.cumsum(pidx[picks.astype(np.int64) + 1] - pidx[picks], out=cum[1:])
  # Greedy packing: a batch starts at a new group and ends with the first group
  # that fills it (that group's surplus examples are dropped).
  starts = [0]
  while cum[starts[-1]] + global_batch_size <= cum[-1]:
    starts.append(int(np.searchsorted(cum, cum[starts[-1]] + global_batch_size, side="left")))
  starts = np.asarray(starts, np.int64)
  return SegmentPlan(set_name, counter, picks[:starts[-1]].copy(), starts)


class TrainSampler:
  """The global batch plan of every pass; picklable (caches are rebuilt in workers)."""

  _MAX_CACHED_PLANS = 3

  def __init__(self, info: dataset_format.SplitInfo, seed: int, epochs_per_iter: int, global_batch_size: int):
    self.info = info
    self.seed = seed
    self.epochs_per_iter = epochs_per_iter
    self.global_batch_size = global_batch_size
    self._init_caches()

  def _init_caches(self):
    self._lock = threading.RLock()
    self._plans: dict[int, list[SegmentPlan]] = {}
    self._counts: dict[int, int] = {}

  def __getstate__(self):
    state = self.__dict__.copy()
    for k in ("_lock", "_plans", "_counts"):
      del state[k]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_caches()

  def pass_plan(self, pass_index: int) -> list[SegmentPlan]:
    with self._lock:
      plan = self._plans.get(pass_index)
      if plan is None:
        names = self.info.metadata.sets
        plan = [plan_segment(self.info.sets[n], n, pass_index * len(names) + k + 1, self.seed,
                              self.epochs_per_iter, self.global_batch_size)
                for k, n in enumerate(names)]
        if len(self._plans) >= self._MAX_CACHED_PLANS:
          del self._plans[min(self._plans)]
        self._plans[pass_index] = plan
        self._counts[pass_index] = sum(seg.num_batches for seg in plan)
      return plan

  def batches_in_pass(self, pass_index: int) -> int:
    with self._lock:
      if pass_index not in self._counts:
        self.pass_plan(pass_index)
      return self._counts[pass_index]

  def next_position(self, pass_index: int, batch_index: int) -> tuple[int, int]:
    """The position of the batch after ``(pass_index, batch_index)``."""
    if batch_index + 1 < self.batches_in_pass(pass_index):
      return pass_index, batch_index + 1
    return pass_index + 1, 0

  def global_batch(self, pass_index: int, batch_index: int) -> tuple[str, np.ndarray, np.ndarray]:
    """(set name, example rows [B], puzzle indices [B]) of one global batch."""
    for seg in self.pass_plan(pass_index):
      if batch_index < seg.num_batches:
        break
      batch_index -= seg.num_batches
    else:
      raise IndexError(f"pass {pass_index} has no batch {batch_index}")
    s = self.info.sets[seg.set_name]
    puzzles = seg.picks[seg.starts[batch_index]:seg.starts[batch_index + 1]].astype(np.int64)
    first = s.puzzle_indices[puzzles].astype(np.int64)
    sizes = s.puzzle_indices[puzzles + 1].astype(np.int64) - first
    take = sizes.copy()
    take[-1] = self.global_batch_size - sizes[:-1].sum()
    # Distinct random examples per puzzle: order each puzzle's examples by random
    # keys and keep the first `take`.
    keys = np.random.default_rng([self.seed, seg.counter, batch_index, EXAMPLE_CHOICE_TAG]).random(sizes.sum())
    entry = np.repeat(np.arange(puzzles.shape[0]), sizes)
    order = np.lexsort((keys, entry))
    entry_first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    keep = (np.arange(order.shape[0]) - entry_first) < take[entry]
    rows = first[entry] + (order - entry_first)
    return seg.set_name, rows[keep], puzzles[entry[keep]]
