"""Input pipeline (SPEC §7–§8): train and test batches from a data_prep dataset.

The dataset format is the one of ``trm_jax.dataset_format`` (ArrayRecord shards of
examples, per-set index arrays, ``dataset.json``). Reading, decoding and
prefetching run on grain; the sampler is plain numpy.

Usage::

  from trm_jax import data

  info = data.load_dataset_info(dataset_dir, "train")   # metadata, index arrays
  train = data.make_train_iterator(
      dataset_dir, global_batch_size=768, seed=0, epochs_per_iter=10000,
      process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(train)   # {"inputs": [b, S], "labels": [b, S], "puzzle_identifiers": [b]}
  state = train.get_state()      # small JSON-able dict; store it in the checkpoint
  train.set_state(state)         # the next batches are those that followed `state`
  train.close()

  for set_name, batch, num_examples in data.make_test_iterator(
      dataset_dir, global_batch_size=768, process_index=..., process_count=...):
    ...

Batches are dicts of int32 numpy arrays with static shapes, ``b`` the local
batch size ``global_batch_size // process_count``: ``inputs [b, S]``,
``labels [b, S]`` (labels equal to the metadata's ``ignore_label_id`` become
-100), ``puzzle_identifiers [b]``. Every process computes the same global batch
plan and reads only its rows ``[process_index * b, (process_index + 1) * b)``.

Train batches (SPEC §8, the original's ``PuzzleDataset._iter_train``; the
batch plan itself is ``trm_jax.sampler``). Passes
run one after the other forever (or ``num_passes`` of them); one pass is
``epochs_per_iter`` epochs, i.e. the original's "iteration". For pass ``p`` and
the ``k``-th set of the split (of ``n`` sets), the group order and puzzle picks
come from ``Generator(Philox(seed=seed + p * n + k + 1))`` exactly as in the
original: ``epochs_per_iter`` permutations of the groups, then one
``integers(group_start, group_end)`` per visited group. Batches are packed as
in the original (a puzzle contributes as many distinct random examples as still
fit; a batch can mix puzzles; the pass's last incomplete batch is dropped), so
with the same seed and dataset the sequence of batches, their puzzles and
puzzle identifiers equal the original's. The one deliberate difference: the
original chooses the examples within a puzzle with the *global*
``np.random.choice`` of its data-loader worker, a stream that torch's
DataLoader seeds from the torch generator (seeded with seed + rank, and used by
model initialisation first): it cannot be reproduced, and it differs between
ranks, so the original's ranks do not even agree on one global batch. Here the choice comes from a generator seeded by
``(seed, counter, batch)``, identical on every process. With one example per
puzzle (Sudoku, Maze) the batches are therefore exactly the original's.

``TrainIterator.pass_index`` / ``batch_index`` say where the next batch lies,
and ``batches_in_pass(p)`` gives the exact number of full batches of pass
``p`` (it varies slightly from pass to pass: it depends on the puzzles picked).
A trainer that evaluates after every pass, like the original, checks
``train.batch_index == 0`` after ``next(train)``.

Test batches: the examples of every set in order, in global batches; the last
batch of a set is padded (``pad_id`` inputs, -100 labels, blank identifier).
Each item is ``EvalBatch(set_name, batch, num_examples)`` with the real
(unpadded) number of examples of the global batch. A puzzle identifier comes
from ``puzzle_indices`` (the puzzle holding the example).

Iterator state: ``get_state()`` is a plain dict (pass, batch and the
configuration it belongs to); ``set_state()`` rebuilds the pipeline at that
position, also with worker processes, and raises ``ValueError`` naming the
difference when the state belongs to another dataset, batch size, seed,
``epochs_per_iter`` or process count. The state does not depend on
``num_workers``/``prefetch``, nor on the process that saved it.

Reading: ``num_workers=0`` reads in this process with ``read_threads`` threads
and ``prefetch`` batches ahead (grain ``to_iter_dataset``); ``num_workers > 0``
adds grain worker processes (``mp_prefetch``), each reading every
``num_workers``-th batch. Measured on a 2-core CPU VM with an ARC-like dataset
(S=900, zstd, 210k examples, page cache warm), global batch 768: 40-90
batches/s in process (~10 ms per batch, mostly ArrayRecord reads), 30-65
batches/s with 2 workers (the VM has only 2 cores, and batches then cross
processes), plus 4-9 s to start the workers. A trainer needs ~4-10 batches/s,
so the default is in process. Planning a pass (group order and puzzle picks,
vectorised) takes ~3 s for 9.6M visited groups (ARC-AGI, 10000 epochs/pass).

Worker processes are spawned: each re-imports the main module (keep the entry
point under ``if __name__ == "__main__":``) and unpickles the pipeline. absl
pitfall: flags are parsed only in the parent (``app.run``); any code that reads
``FLAGS`` in a worker, including code run at import time of the main module,
raises ``UnparsedFlagAccessError`` there. Keep flag reads inside ``main``, or
call ``flags.FLAGS.mark_as_parsed()`` at import time outside ``app.run``. grain
itself reads absl flags when it starts workers: in a program that is not an
absl app this module marks ``FLAGS`` as parsed (all defaults) before it starts
workers. ``close()`` (or ``with``) stops the workers; ``set_state`` restarts
them.

Several dataset directories train as one (the original's ``data_paths``):
``load_dataset_info`` merges their splits the way the original's
``PuzzleDataset`` does. Set ``s`` of directory ``i > 0`` is named ``s<i>``
and the sets come set by set, each directory's in turn (``all``, ``all1``,
...), so a pass samples each directory's set separately with the original's
seeds; the directories must agree on seq_len, vocab_size, pad_id,
ignore_label_id, blank_identifier_id, the set names and
num_puzzle_identifiers (the original asserts the same), the merged table has
the sum of their rows, and puzzle identifiers are used as stored (so
directories built from the same puzzles share embedding rows, as in the
original).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import threading
from typing import Any, Iterator, NamedTuple, Sequence

from absl import flags
import grain
import numpy as np

from trm_jax import dataset_format
from trm_jax import sampler as sampler_lib

IGNORE_LABEL = dataset_format.IGNORE_LABEL
TRAIN_STATE_FORMAT = "trm_jax.data.train/v1"
# Length of the (endless) grain source of train batches; grain handles
# sys.maxsize-long datasets (it is what `repeat()` produces).
_UNBOUNDED = sys.maxsize


# ---------------------------------------------------------------------------
# Dataset access.


DatasetDirs = str | os.PathLike | Sequence[str | os.PathLike]


def load_dataset_info(dataset_dir: DatasetDirs, split: str = "train") -> dataset_format.SplitInfo:
  """Metadata and index arrays of one split (``.metadata`` holds SPEC §7's fields).

  ``dataset_dir`` may be a sequence of directories: their splits are merged
  as the original merges its ``data_paths`` (see the module docstring).
  """
  if not isinstance(dataset_dir, (str, os.PathLike)):
    dirs = [pathlib.Path(d) for d in dataset_dir]
    if not dirs:
      raise dataset_format.DatasetFormatError("no dataset directory given")
    if len(dirs) > 1:
      return merge_splits([load_dataset_info(d, split) for d in dirs])
    dataset_dir = dirs[0]
  dataset_dir = pathlib.Path(dataset_dir)
  if not dataset_dir.is_dir():
    raise dataset_format.DatasetFormatError(f"dataset directory {dataset_dir} does not exist")
  info = dataset_format.load_split(dataset_dir / split)
  for s in info.sets.values():
    _check_set_index(info.path, s)
  return info


_MUST_AGREE = ("seq_len", "vocab_size", "pad_id", "ignore_label_id", "blank_identifier_id", "sets",
               "num_puzzle_identifiers")


def merge_splits(infos: Sequence[dataset_format.SplitInfo]) -> dataset_format.SplitInfo:
  """One split of several directories, as the original's ``PuzzleDataset`` merges ``dataset_paths``.

  Sets are renamed ``<set><i>`` for the ``i``-th directory (``i > 0``) and
  ordered set by set, directory by directory; the counts add up and
  ``mean_puzzle_examples`` is the puzzle-weighted mean, which gives the
  original's schedule length.
  """
  first = infos[0]
  for other in infos[1:]:
    for field in _MUST_AGREE:
      a, b = getattr(first.metadata, field), getattr(other.metadata, field)
      if a != b:
        raise dataset_format.DatasetFormatError(
            f"datasets {first.path.parent} and {other.path.parent} cannot train together: {field} is "
            f"{a!r} in the first and {b!r} in the second (data_path lists directories that must agree on "
            f"{', '.join(_MUST_AGREE)})")
    if other.task != first.task:
      raise dataset_format.DatasetFormatError(f"datasets {first.path.parent} and {other.path.parent} cannot train "
                                              f"together: they hold the tasks {first.task!r} and {other.task!r}")
    if other.token_dtype != first.token_dtype:
      raise dataset_format.DatasetFormatError(f"datasets {first.path.parent} and {other.path.parent} store tokens as "
                                      f"{first.token_dtype} and {other.token_dtype}; rebuild one of them")
  names, sets = [], {}
  for set_name in first.metadata.sets:
    for i, info in enumerate(infos):
      name = set_name + (str(i) if i else "")
      if name in sets:
        raise dataset_format.DatasetFormatError(f"dataset {info.path.parent}: merged set name {name!r} is taken twice "
                                        "(a set named like another set plus a digit)")
      names.append(name)
      sets[name] = dataclasses.replace(info.sets[set_name], name=name)
  total_puzzles = sum(i.metadata.total_puzzles for i in infos)
  mean_examples = sum(i.metadata.mean_puzzle_examples * i.metadata.total_puzzles for i in infos) / total_puzzles
  metadata = dataclasses.replace(
      first.metadata, num_puzzle_identifiers=sum(i.metadata.num_puzzle_identifiers for i in infos),
      total_groups=sum(i.metadata.total_groups for i in infos), mean_puzzle_examples=mean_examples,
      total_puzzles=total_puzzles, sets=names)
  return dataclasses.replace(first, metadata=metadata, sets=sets)


def _set_dir(split_dir: pathlib.Path, s: dataset_format.SetIndex) -> pathlib.Path:
  """The directory holding a set's shards (another directory's for a merged set)."""
  return pathlib.Path(s.shard_paths[0]).parent if s.shard_paths else split_dir


def _check_set_index(split_dir: pathlib.Path, s: dataset_format.SetIndex) -> None:
  where = f"{split_dir / dataset_format.index_name(s.name)}"
  if s.num_puzzles and np.any(np.diff(s.puzzle_indices) < 1):
    raise dataset_format.DatasetFormatError(f"{where}: puzzle_indices must increase (every puzzle needs an example)")
  if s.num_groups and np.any(np.diff(s.group_indices) < 1):
    raise dataset_format.DatasetFormatError(f"{where}: group_indices must increase (every group needs a puzzle)")


def _unreadable(path: str, error: BaseException) -> dataset_format.DatasetFormatError:
  """A shard ArrayRecord cannot read (truncated, garbled): one line naming the file."""
  detail = (str(error).strip().splitlines() or [error.__class__.__name__])[0][:200]
  return dataset_format.DatasetFormatError(f"{path}: cannot read its records, the file is damaged ({detail}); "
                                           "rebuild the dataset")


class _SetReader:
  """Reads rows of one set from its ArrayRecord shards; picklable, opens lazily."""

  def __init__(self, split_dir: pathlib.Path, s: dataset_format.SetIndex, seq_len: int, dtype: np.dtype):
    self._split_dir = split_dir
    self._name = s.name
    self._paths = [str(p) for p in s.shard_paths]
    self._num_examples = s.num_examples
    self._row_len = 2 * seq_len
    self._dtype = np.dtype(dtype)
    self._readers = None
    self._offsets = None
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_readers"] = state["_offsets"] = state["_lock"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _open(self):
    with self._lock:
      if self._readers is not None:
        return
      from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
      # Random access: no read-ahead (it would read records nobody asked for).
      readers = []
      for p in self._paths:
        try:
          readers.append(array_record_module.ArrayRecordReader(p, "readahead_buffer_size:0"))
        except (RuntimeError, ValueError, OSError) as e:
          raise _unreadable(p, e) from None
      offsets = np.concatenate([[0], np.cumsum([r.num_records() for r in readers])]).astype(np.int64)
      if offsets[-1] != self._num_examples:
        raise dataset_format.DatasetFormatError(
            f"{self._split_dir}: set {self._name!r} has {offsets[-1]} records in its shards, "
            f"dataset.json says {self._num_examples}")
      self._offsets = offsets
      self._readers = readers

  def read(self, rows: np.ndarray) -> np.ndarray:
    """Returns ``[len(rows), 2 * S]`` tokens (inputs then labels) of the given examples."""
    if self._readers is None:
      self._open()
    rows = np.asarray(rows, np.int64)
    out = np.empty((rows.shape[0], self._row_len), self._dtype)
    if rows.shape[0] == 0:
      return out
    shard = np.searchsorted(self._offsets, rows, side="right") - 1
    for sh in np.unique(shard):
      where = np.flatnonzero(shard == sh)
      try:
        records = self._readers[sh].read((rows[where] - self._offsets[sh]).tolist())
      except (RuntimeError, ValueError, OSError) as e:
        raise _unreadable(self._paths[sh], e) from None
      buf = b"".join(records)
      if len(buf) != where.shape[0] * out.itemsize * self._row_len:
        raise dataset_format.DatasetFormatError(
            f"{self._paths[sh]}: records are not {self._row_len} tokens of {self._dtype}")
      out[where] = np.frombuffer(buf, self._dtype).reshape(where.shape[0], self._row_len)
    return out


def _make_batch(tokens: np.ndarray, identifiers: np.ndarray, batch_size: int,
                meta: dataset_format.DatasetMetadata) -> dict[str, np.ndarray]:
  """Builds the int32 batch from ``[n, 2S]`` tokens, padding rows ``n..batch_size``."""
  n, seq_len = tokens.shape[0], meta.seq_len
  inputs = np.full((batch_size, seq_len), meta.pad_id, np.int32)
  labels = np.full((batch_size, seq_len), IGNORE_LABEL, np.int32)
  puzzle_identifiers = np.full((batch_size,), meta.blank_identifier_id, np.int32)
  inputs[:n] = tokens[:, :seq_len]
  real_labels = labels[:n]
  real_labels[...] = tokens[:, seq_len:]
  if meta.ignore_label_id is not None:
    real_labels[real_labels == meta.ignore_label_id] = IGNORE_LABEL
  puzzle_identifiers[:n] = identifiers
  return {"inputs": inputs, "labels": labels, "puzzle_identifiers": puzzle_identifiers}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
  if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size < 1:
    raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size {global_batch_size} is not divisible by the "
                     f"process count {process_count}")
  return global_batch_size // process_count


def _check_grain_options(num_workers: int, prefetch: int, read_threads: int) -> None:
  if num_workers < 0 or prefetch < 0 or read_threads < 1:
    raise ValueError(f"need num_workers >= 0, prefetch >= 0, read_threads >= 1; got "
                     f"{num_workers}, {prefetch}, {read_threads}")


class _Pipeline:
  """A grain iterator (in-process or with workers) that can be closed."""

  def __init__(self, ds: grain.MapDataset, num_workers: int, prefetch: int, read_threads: int):
    _check_grain_options(num_workers, prefetch, read_threads)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if num_workers > 0:
      # grain reads absl flags of its own when it starts workers; in a program
      # that is not an absl app nobody parses them: they keep their defaults.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=num_workers, per_worker_buffer_size=max(prefetch, 1)))
    self._from_workers = num_workers > 0
    self._it = iter(it_ds)

  def __next__(self):
    element = next(self._it)
    # Workers hand over arrays in shared memory (a numpy subclass that unlinks
    # its segment when deleted); plain copies keep that away from the caller.
    return _plain_copy(element) if self._from_workers else element

  def close(self) -> None:
    it, self._it = self._it, None
    if it is None:
      return
    close = getattr(it, "close", None)
    if close is not None:
      close()
      return
    # grain < 0.2.13: the multiprocess iterator wraps its worker pool in a
    # generator whose `with` block shuts the pool down when the generator closes.
    inner = getattr(it, "_iterator", None)
    if inner is not None and hasattr(inner, "close"):
      inner.close()


def _plain_copy(x):
  if isinstance(x, np.ndarray):
    return np.array(x)
  if isinstance(x, dict):
    return {k: _plain_copy(v) for k, v in x.items()}
  if isinstance(x, EvalBatch):
    return x._replace(batch=_plain_copy(x.batch))
  if isinstance(x, tuple):
    return tuple(_plain_copy(v) for v in x)
  return x


class _TrainSource:
  """grain source: i -> the rows this process reads for the i-th batch from ``start``."""

  def __init__(self, sampler: sampler_lib.TrainSampler, start: tuple[int, int], rows: slice):
    self._sampler = sampler
    self._start = start
    self._rows = rows
    self._init_offsets()

  def _init_offsets(self):
    # _pass_offsets[j]: index of the first batch of pass start[0] + j.
    self._pass_offsets = [-self._start[1]]
    self._lock = threading.Lock()

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_pass_offsets"], state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_offsets()

  def __len__(self) -> int:
    return _UNBOUNDED

  def _position(self, i: int) -> tuple[int, int]:
    with self._lock:
      offsets = self._pass_offsets
      while i >= offsets[-1] + self._sampler.batches_in_pass(self._start[0] + len(offsets) - 1):
        offsets.append(offsets[-1] + self._sampler.batches_in_pass(self._start[0] + len(offsets) - 1))
      j = bisect.bisect_right(offsets, i) - 1
      return self._start[0] + j, i - offsets[j]

  def __getitem__(self, i: int):
    position = self._position(int(i))
    set_name, rows, puzzles = self._sampler.global_batch(*position)
    return position, set_name, rows[self._rows], puzzles[self._rows]


class _ReadTrainBatch:
  """grain map: reads and decodes the rows chosen by ``_TrainSource``."""

  def __init__(self, info: dataset_format.SplitInfo, local_batch_size: int):
    self._meta = info.metadata
    self._identifiers = {n: s.puzzle_identifiers for n, s in info.sets.items()}
    self._readers = {n: _SetReader(_set_dir(info.path, s), s, info.metadata.seq_len, info.token_dtype)
                     for n, s in info.sets.items()}
    self._local_batch_size = local_batch_size

  def __call__(self, request):
    position, set_name, rows, puzzles = request
    tokens = self._readers[set_name].read(rows)
    batch = _make_batch(tokens, self._identifiers[set_name][puzzles], self._local_batch_size, self._meta)
    return position, batch


def _dataset_fingerprint(info: dataset_format.SplitInfo) -> str:
  h = hashlib.sha256()
  h.update(json.dumps(info.metadata.to_json_dict(), sort_keys=True).encode())
  h.update(info.token_dtype.str.encode())
  for name in info.metadata.sets:
    s = info.sets[name]
    h.update(f"{name}:{s.num_examples}".encode())
    for arr in (s.puzzle_identifiers, s.puzzle_indices, s.group_indices):
      h.update(np.ascontiguousarray(arr, "<i8").tobytes())
  return h.hexdigest()[:16]


class _ClosingIterator:
  """``close()`` (stops prefetching: threads, worker processes) and ``with`` support."""
  _it: Any = None

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None:
      it.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class TrainIterator(_ClosingIterator, Iterator[dict[str, np.ndarray]]):
  """Endless (or ``num_passes``-long) iterator of train batches; see the module docstring."""

  def __init__(self, info: dataset_format.SplitInfo, *, global_batch_size: int, seed: int, epochs_per_iter: int,
               process_index: int = 0, process_count: int = 1, num_passes: int | None = None,
               num_workers: int = 0, prefetch: int = 4, read_threads: int = 2):
    self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(epochs_per_iter, (int, np.integer)) or epochs_per_iter < 1:
      raise ValueError(f"epochs_per_iter must be a positive integer, got {epochs_per_iter!r}")
    if num_passes is not None and num_passes < 0:
      raise ValueError(f"num_passes must be >= 0 or None, got {num_passes}")
    self.info = info
    self.metadata = info.metadata
    self.global_batch_size = int(global_batch_size)
    self.process_index, self.process_count = process_index, process_count
    self.num_passes = num_passes
    self._check_pass_fills_a_batch(epochs_per_iter)
    self._sampler = sampler_lib.TrainSampler(info, int(seed), int(epochs_per_iter), self.global_batch_size)
    self._config = {
        "format": TRAIN_STATE_FORMAT,
        "dataset": _dataset_fingerprint(info),
        "split": info.path.name,
        "seed": int(seed),
        "epochs_per_iter": int(epochs_per_iter),
        "global_batch_size": self.global_batch_size,
        "process_count": int(process_count),
    }
    self._grain_options = (num_workers, prefetch, read_threads)
    _check_grain_options(*self._grain_options)
    self._reader = _ReadTrainBatch(info, self.local_batch_size)
    self._rows = slice(process_index * self.local_batch_size, (process_index + 1) * self.local_batch_size)
    self.pass_index = 0
    self.batch_index = 0
    self._it = None

  def _check_pass_fills_a_batch(self, epochs_per_iter: int) -> None:
    """A pass must always yield a batch: else the iterator would never yield one."""
    guaranteed = {}
    for name in self.metadata.sets:
      s = self.info.sets[name]
      if s.num_groups == 0:
        guaranteed[name] = 0
        continue
      sizes = np.diff(s.puzzle_indices)
      smallest = np.minimum.reduceat(sizes, s.group_indices[:-1].astype(np.int64))
      guaranteed[name] = int(smallest.sum()) * epochs_per_iter
    if max(guaranteed.values(), default=0) < self.global_batch_size:
      raise ValueError(
          f"global_batch_size {self.global_batch_size} is larger than one pass over "
          f"{self.info.path} can fill: a pass ({epochs_per_iter} epoch(s)) is only sure to hold "
          f"{guaranteed} examples per set; lower global_batch_size or raise epochs_per_iter")

  def batches_in_pass(self, pass_index: int) -> int:
    """The exact number of (full) global batches of pass ``pass_index``."""
    return self._sampler.batches_in_pass(pass_index)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_passes is not None and self.pass_index >= self.num_passes:
      self.close()
      raise StopIteration
    if self._it is None:
      source = _TrainSource(self._sampler, (self.pass_index, self.batch_index), self._rows)
      self._it = _Pipeline(grain.MapDataset.source(source).map(self._reader), *self._grain_options)
    position, batch = next(self._it)
    if position != (self.pass_index, self.batch_index):  # The pipeline must yield in order.
      raise RuntimeError(f"input pipeline out of order: got batch {position}, "
                         f"expected {(self.pass_index, self.batch_index)}")
    self.pass_index, self.batch_index = self._sampler.next_position(self.pass_index, self.batch_index)
    return batch

  def get_state(self) -> dict[str, Any]:
    """Plain-JSON position of the next batch, with the configuration it belongs to."""
    return {**self._config, "pass": self.pass_index, "batch": self.batch_index}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from ``state`` (from ``get_state`` of an iterator with the same configuration)."""
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
      raise ValueError(f"not a train iterator state of format {TRAIN_STATE_FORMAT!r}: {state!r:.200}")
    diffs = [f"{k}: state has {state.get(k)!r}, this iterator {v!r}"
             for k, v in self._config.items() if state.get(k) != v]
    if diffs:
      raise ValueError("the iterator state belongs to another input configuration (" + "; ".join(diffs) + ")")
    p, b = state.get("pass"), state.get("batch")
    if not (isinstance(p, int) and isinstance(b, int) and p >= 0 and 0 <= b < self.batches_in_pass(p)):
      raise ValueError(f"iterator state position pass={p!r} batch={b!r} is not a batch of this dataset")
    self.close()
    self.pass_index, self.batch_index = p, b



def make_train_iterator(dataset_dir: DatasetDirs, split: str = "train", *, global_batch_size: int,
                        seed: int, epochs_per_iter: int, process_index: int = 0, process_count: int = 1,
                        num_passes: int | None = None, num_workers: int = 0, prefetch: int = 4,
                        read_threads: int = 2) -> TrainIterator:
  """Train batches of ``<dataset_dir>/<split>`` (SPEC §8); see the module docstring.

  Args:
    dataset_dir: a directory written by ``data_prep``, or several to merge (the original's ``data_paths``).
    split: the split to read.
    global_batch_size: examples per global batch (all processes together).
    seed: the run's seed (pass ``p`` of set ``k`` uses the original's seed + p * num_sets + k + 1).
    epochs_per_iter: epochs per pass (the original's ``eval_interval``).
    process_index, process_count: this process's rows of the global batch.
    num_passes: stop after this many passes; None: never stop.
    num_workers: grain worker processes (0: read in this process).
    prefetch: batches read ahead (per worker with workers).
    read_threads: threads reading batches (in this process or each worker).
  """
  return TrainIterator(load_dataset_info(dataset_dir, split), global_batch_size=global_batch_size,
                       seed=seed, epochs_per_iter=epochs_per_iter, process_index=process_index,
                       process_count=process_count, num_passes=num_passes, num_workers=num_workers,
                       prefetch=prefetch, read_threads=read_threads)


# ---------------------------------------------------------------------------
# Test batches.


class EvalBatch(NamedTuple):
  set_name: str
  batch: dict[str, np.ndarray]
  num_examples: int  # Real (unpadded) examples in the global batch.


class _ReadTestBatch:
  """grain map: (set, global start, global end) -> EvalBatch for this process."""

  def __init__(self, info: dataset_format.SplitInfo, local_batch_size: int, process_index: int):
    self._meta = info.metadata
    self._index = {n: (s.puzzle_indices, s.puzzle_identifiers) for n, s in info.sets.items()}
    self._readers = {n: _SetReader(_set_dir(info.path, s), s, info.metadata.seq_len, info.token_dtype)
                     for n, s in info.sets.items()}
    self._local_batch_size = local_batch_size
    self._process_index = process_index

  def __call__(self, request) -> EvalBatch:
    set_name, start, end = request
    local_start = min(start + self._process_index * self._local_batch_size, end)
    rows = np.arange(local_start, min(local_start + self._local_batch_size, end), dtype=np.int64)
    puzzle_indices, identifiers = self._index[set_name]
    puzzles = np.searchsorted(puzzle_indices, rows, side="right") - 1
    tokens = self._readers[set_name].read(rows)
    batch = _make_batch(tokens, identifiers[puzzles], self._local_batch_size, self._meta)
    return EvalBatch(set_name, batch, end - start)


class EvalIterator(_ClosingIterator, Iterator[EvalBatch]):
  """One walk over the test examples (SPEC §8); ``len()`` is its number of batches."""

  def __init__(self, info: dataset_format.SplitInfo, *, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, num_workers: int = 0, prefetch: int = 4, read_threads: int = 2):
    self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
    _check_grain_options(num_workers, prefetch, read_threads)
    self.info = info
    self.metadata = info.metadata
    requests = []
    for name in info.metadata.sets:
      n = info.sets[name].num_examples
      requests += [(name, start, min(start + global_batch_size, n)) for start in range(0, n, global_batch_size)]
    self._num_batches = len(requests)
    ds = grain.MapDataset.source(requests).map(_ReadTestBatch(info, self.local_batch_size, process_index))
    self._it = _Pipeline(ds, num_workers, prefetch, read_threads) if requests else None

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self):
    return self

  def __next__(self) -> EvalBatch:
    if self._it is None:
      raise StopIteration
    try:
      return next(self._it)
    except StopIteration:
      self.close()
      raise



def make_test_iterator(dataset_dir: DatasetDirs, split: str = "test", *, global_batch_size: int,
                       process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                       prefetch: int = 4, read_threads: int = 2) -> EvalIterator:
  """One walk over the examples of ``<dataset_dir>/<split>`` in padded global batches."""
  return EvalIterator(load_dataset_info(dataset_dir, split), global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count,
                      num_workers=num_workers, prefetch=prefetch, read_threads=read_threads)
