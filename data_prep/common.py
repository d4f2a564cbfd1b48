"""Writing datasets in the format of ``trm_jax.dataset_format``, and the builders' shared flags.

Writers stream: a set writer holds only the index arrays (a few bytes per
puzzle) and the ArrayRecord writer's current shard; examples go straight to
disk. A build happens in a temporary directory beside the output and is renamed
into place only when everything has been written, so a failed or interrupted
build never leaves something that loads as a dataset.

The format's names, metadata, errors and reader are ``trm_jax.dataset_format``
(``trm_jax`` reads datasets without importing ``data_prep``); they are
re-exported here so that the builders name one module.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import tempfile
import threading
from typing import Any

import numpy as np

from trm_jax import dataset_format
from trm_jax import tasks
# Re-exported: the builders and their tests name them as ``common.X``.
from trm_jax.dataset_format import (  # pylint: disable=unused-import
    DEFAULT_EXAMPLES_PER_SHARD, FORMAT_NAME, IDENTIFIERS_FILE, IGNORE_LABEL, METADATA_FILE, TEST_PUZZLES_FILE,
    DatasetFormatError, DatasetMetadata, ExampleReader, SetIndex, SplitInfo, index_name, input_exists, input_path,
    load_split, open_input, shard_name, token_dtype_for, warn, write_json)

ARRAY_RECORD_OPTIONS = dataset_format.ARRAY_RECORD_OPTIONS
# The raw puzzle files shipped with the project (ARC JSON, Sudoku lists), xz-compressed.
RAW_DATA_DIR = pathlib.Path(__file__).resolve().parent / "raw"


class SetWriter:
  """Streams the examples of one set of one split to ArrayRecord shards.

  Usage: ``add_puzzle`` for every puzzle of a group, then ``end_group``; at
  the end ``close``. Shard files are written with a temporary name and renamed
  to ``..-of-N`` once N is known.
  """

  def __init__(self, split_dir: pathlib.Path, set_name: str, seq_len: int, vocab_size: int,
               examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._arm = array_record_module
    self.split_dir = pathlib.Path(split_dir)
    self.set_name = set_name
    self.seq_len = int(seq_len)
    self.vocab_size = int(vocab_size)
    self.dtype = token_dtype_for(vocab_size)
    self.examples_per_shard = int(examples_per_shard)
    self._shard_paths: list[pathlib.Path] = []
    self._writer = None
    self._in_shard = 0
    self.num_examples = 0
    self._puzzle_identifiers: list[int] = []
    self._puzzle_indices: list[int] = [0]
    self._group_indices: list[int] = [0]
    self._closed = False

  def _open_shard(self):
    path = self.split_dir / f".{self.set_name}__shard{len(self._shard_paths):05d}.tmp"
    self._shard_paths.append(path)
    self._writer = self._arm.ArrayRecordWriter(str(path), ARRAY_RECORD_OPTIONS)
    self._in_shard = 0

  def add_puzzle(self, inputs: np.ndarray, labels: np.ndarray, identifier: int) -> None:
    """Appends one puzzle: ``inputs``/``labels`` are ``[n_examples, seq_len]`` tokens."""
    inputs = np.asarray(inputs)
    labels = np.asarray(labels)
    if inputs.ndim != 2 or inputs.shape != labels.shape or inputs.shape[1] != self.seq_len:
      raise ValueError(
          f"set {self.set_name!r}: a puzzle needs inputs and labels of shape [n, {self.seq_len}], "
          f"got {inputs.shape} and {labels.shape}")
    if inputs.shape[0] == 0:
      raise ValueError(f"set {self.set_name!r}: a puzzle needs at least one example")
    for name, arr in (("inputs", inputs), ("labels", labels)):
      if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
        raise ValueError(f"set {self.set_name!r}: {name} tokens outside [0, {self.vocab_size})")
    rows = np.concatenate([inputs, labels], axis=1).astype(self.dtype)
    for row in rows:
      if self._writer is None or self._in_shard >= self.examples_per_shard:
        if self._writer is not None:
          self._writer.close()
        self._open_shard()
      self._writer.write(row.tobytes())
      self._in_shard += 1
    self.num_examples += rows.shape[0]
    self._puzzle_indices.append(self.num_examples)
    self._puzzle_identifiers.append(int(identifier))

  def end_group(self) -> None:
    if len(self._puzzle_identifiers) == self._group_indices[-1]:
      raise ValueError(f"set {self.set_name!r}: end_group() with no puzzle added since the last group")
    self._group_indices.append(len(self._puzzle_identifiers))

  @property
  def num_puzzles(self) -> int:
    return len(self._puzzle_identifiers)

  @property
  def num_groups(self) -> int:
    return len(self._group_indices) - 1

  def close(self) -> None:
    if self._closed:
      return
    if self._group_indices[-1] != len(self._puzzle_identifiers):
      raise ValueError(f"set {self.set_name!r}: puzzles added after the last end_group()")
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if not self._shard_paths:  # An empty set still gets one (empty) shard.
      self._open_shard()
      self._writer.close()
      self._writer = None
    n = len(self._shard_paths)
    for i, p in enumerate(self._shard_paths):
      p.rename(self.split_dir / shard_name(self.set_name, i, n))
    np.savez(self.split_dir / index_name(self.set_name),
             puzzle_identifiers=np.asarray(self._puzzle_identifiers, np.int32),
             puzzle_indices=np.asarray(self._puzzle_indices, np.int64),
             group_indices=np.asarray(self._group_indices, np.int64))
    self._closed = True


class DatasetWriter:
  """Builds a dataset directory atomically (context manager).

  ``with DatasetWriter(out_dir) as ds: ...`` writes into a temporary sibling
  directory; on a clean exit it replaces ``out_dir`` (only with
  ``overwrite=True`` if it exists), on an exception it deletes everything.
  SIGTERM and SIGHUP (a job scheduler stopping the build) delete it too, then
  end the process by that signal as before. The temporary name holds the
  host and pid of the builder, so that a later build removes what a process
  killed outright (SIGKILL) left behind.
  """

  def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False,
               examples_per_shard: int = DEFAULT_EXAMPLES_PER_SHARD):
    self.output_dir = pathlib.Path(output_dir).absolute()
    self.overwrite = overwrite
    self.examples_per_shard = examples_per_shard
    self.tmp_dir: pathlib.Path | None = None
    self._set_writers: dict[str, list[SetWriter]] = {}
    self._split_metadata: dict[str, DatasetMetadata] = {}

  def __enter__(self) -> "DatasetWriter":
    if self.output_dir.exists() and not self.overwrite:
      raise FileExistsError(f"output directory {self.output_dir} already exists (pass --overwrite to replace it)")
    self.output_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(self.output_dir)
    self.tmp_dir = pathlib.Path(tempfile.mkdtemp(
        prefix=f".{self.output_dir.name}.building-{socket.gethostname()}-{os.getpid()}-",
        dir=self.output_dir.parent))
    self._catch_signals()
    # mkdtemp makes the directory private (0700); the finished dataset gets the
    # usual permissions (0777 less the umask), like any directory made by mkdir.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(self.tmp_dir, 0o777 & ~umask)
    return self

  def set_writer(self, split: str, set_name: str, seq_len: int, vocab_size: int) -> SetWriter:
    split_dir = self.tmp_dir / split
    split_dir.mkdir(exist_ok=True)
    if any(w.set_name == set_name for w in self._set_writers.get(split, [])):
      raise ValueError(f"split {split!r} already has a set {set_name!r}")
    w = SetWriter(split_dir, set_name, seq_len, vocab_size, self.examples_per_shard)
    self._set_writers.setdefault(split, []).append(w)
    return w

  def finish_split(self, split: str, *, task: str, num_puzzle_identifiers: int, pad_id: int = 0,
                   ignore_label_id: int | None = 0, blank_identifier_id: int = 0,
                   mean_puzzle_examples: float | None = None,
                   extra: dict[str, Any] | None = None) -> DatasetMetadata:
    """Closes the split's sets and writes its dataset.json (totals over its sets).

    ``task``: the ``trm_jax.tasks`` name of what the data is for, recorded so
    that nothing has to guess it from the shapes.
    """
    tasks.get(task)  # a task trm_jax knows, or a one-line error listing them
    writers = self._set_writers.get(split)
    if not writers:
      raise ValueError(f"split {split!r} has no sets")
    for w in writers:
      w.close()
    seq_len = writers[0].seq_len
    vocab_size = writers[0].vocab_size
    total_examples = sum(w.num_examples for w in writers)
    total_puzzles = sum(w.num_puzzles for w in writers)
    meta = DatasetMetadata(
        seq_len=seq_len, vocab_size=vocab_size, pad_id=pad_id, ignore_label_id=ignore_label_id,
        blank_identifier_id=blank_identifier_id, num_puzzle_identifiers=int(num_puzzle_identifiers),
        total_groups=sum(w.num_groups for w in writers),
        mean_puzzle_examples=(float(mean_puzzle_examples) if mean_puzzle_examples is not None
                              else total_examples / max(total_puzzles, 1)),
        total_puzzles=total_puzzles, sets=[w.set_name for w in writers])
    info = {
        "format": FORMAT_NAME,
        "task": task,
        "token_dtype": writers[0].dtype.str,
        "num_examples": {w.set_name: w.num_examples for w in writers},
        "num_shards": {w.set_name: len(w._shard_paths) for w in writers},  # pylint: disable=protected-access
    }
    if extra:
      info.update(extra)
    write_json(self.tmp_dir / split / METADATA_FILE, {**meta.to_json_dict(), "trm_jax": info})
    self._split_metadata[split] = meta
    return meta

  def write_json(self, relpath: str, obj: Any) -> None:
    write_json(self.tmp_dir / relpath, obj)

  def _catch_signals(self) -> None:
    self._previous_handlers = {}
    if threading.current_thread() is not threading.main_thread():
      return
    def handler(signum, frame):
      del frame
      raise _BuildInterrupted(signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
      self._previous_handlers[sig] = signal.signal(sig, handler)

  def __exit__(self, exc_type, exc, tb) -> bool:
    for sig, previous in self._previous_handlers.items():
      signal.signal(sig, previous)
    try:
      return self._finish(exc_type)
    finally:
      if isinstance(exc, _BuildInterrupted):  # cleaned up: now die of the signal, as without the handler
        os.kill(os.getpid(), exc.signum)

  def _finish(self, exc_type) -> bool:
    if exc_type is None:
      unfinished = [s for s in self._set_writers if s not in self._split_metadata]
      if unfinished:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        raise ValueError(f"splits {unfinished} were written but never finished (finish_split)")
      if self.output_dir.exists():
        old = self.output_dir.with_name(f".{self.output_dir.name}.old-{os.getpid()}")
        self.output_dir.rename(old)
        self.tmp_dir.rename(self.output_dir)
        shutil.rmtree(old, ignore_errors=True)
      else:
        self.tmp_dir.rename(self.output_dir)
    else:
      for ws in self._set_writers.values():
        for w in ws:
          if w._writer is not None:  # pylint: disable=protected-access
            with contextlib.suppress(Exception):
              w._writer.close()  # pylint: disable=protected-access
      shutil.rmtree(self.tmp_dir, ignore_errors=True)
    return False


class _BuildInterrupted(BaseException):
  """SIGTERM / SIGHUP during a build (a BaseException: nothing on the way may swallow it)."""

  def __init__(self, signum: int):
    super().__init__(f"interrupted by signal {signum}")
    self.signum = signum


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale_builds(output_dir: pathlib.Path) -> None:
  """Deletes the temporary directories of builds of ``output_dir`` whose process is gone (this host)."""
  host = socket.gethostname()
  for path in output_dir.parent.glob(f".{output_dir.name}.*"):
    kind, _, rest = path.name[len(output_dir.name) + 2:].partition("-")
    if kind == "building" and rest.startswith(host + "-"):
      pid = rest[len(host) + 1:].split("-", 1)[0]
    elif kind == "old":
      pid = rest
    else:
      continue  # not ours, another host's build, or a build from before the host was recorded
    if pid.isdigit() and not _pid_alive(int(pid)) and path.is_dir():
      warn(f"removing {path}, left by an interrupted build (pid {pid})")
      shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# Shared by the builders' command lines.


def add_output_flags(parser: Any, default_output_dir: str) -> None:
  """``--output-dir``, ``--overwrite`` and ``--seed`` of every builder mode."""
  parser.add_argument("--output-dir", default=default_output_dir,
                      help="dataset directory (default %(default)s)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  parser.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")


def add_csv_input_flags(parser: Any) -> None:
  """The inputs of a ``csv`` mode; read them back with ``csv_inputs``."""
  parser.add_argument("--input-dir", help="directory holding train.csv and test.csv")
  parser.add_argument("--train-csv", help="train CSV (instead of --input-dir)")
  parser.add_argument("--test-csv", help="test CSV (instead of --input-dir)")


def csv_inputs(input_dir: str | None, train_csv: str | None, test_csv: str | None
               ) -> tuple[pathlib.Path, pathlib.Path]:
  """The train/test CSVs of a ``csv`` mode: ``--input-dir`` or both ``--train-csv``/``--test-csv``."""
  if input_dir and (train_csv or test_csv):
    raise ValueError("give either --input-dir or --train-csv/--test-csv, not both")
  if input_dir:
    return pathlib.Path(input_dir) / "train.csv", pathlib.Path(input_dir) / "test.csv"
  if train_csv and test_csv:
    return pathlib.Path(train_csv), pathlib.Path(test_csv)
  raise ValueError("csv mode needs --input-dir, or both --train-csv and --test-csv")


def print_build_summary(metas: dict[str, DatasetMetadata], output_dir: str | os.PathLike, seconds: float) -> None:
  for split, m in metas.items():
    print(f"{split}: {m.total_groups} groups, {m.total_puzzles} puzzles")
  print(f"wrote {output_dir} in {seconds:.1f}s")
