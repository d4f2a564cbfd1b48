"""On-disk dataset format shared by every builder and by the input pipeline.

Layout of a dataset directory (one per task build)::

  <root>/
    identifiers.json            list: puzzle identifier -> name, index 0 "<blank>"
    test_puzzles.json           (ARC only) the original test puzzles with solutions
    <split>/                    "train" and "test"
      dataset.json              metadata (SPEC §7 fields, plus a "trm_jax" block)
      <set>__index.npz          puzzle_identifiers [P] int32,
                                puzzle_indices [P+1] int64, group_indices [G+1] int64
      <set>__examples-00000-of-00002.array_record
                                one record per example (see below)

Record schema (one ArrayRecord record per example, in example order across the
shards of a set): the raw bytes of ``concat(inputs[S], labels[S])`` in the
token dtype named by ``dataset.json["trm_jax"]["token_dtype"]`` (uint8 when the
vocabulary fits in a byte, else uint16, little endian). Records are written
with ``group_size:1`` so that any example can be read on its own (random
access for the sampler), zstd-compressed (ARC canvases are mostly padding).

Writers stream: a set writer holds only the index arrays (a few bytes per
puzzle) and the ArrayRecord writer's current shard; examples go straight to
disk. A build happens in a temporary directory beside the output and is renamed
into place only when everything has been written, so a failed or interrupted
build never leaves something that loads as a dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import lzma
import os
import pathlib
import shutil
import signal
import socket
import sys
import tempfile
import threading
import zipfile
from typing import Any, Sequence

import numpy as np
from trm_jax import errors

FORMAT_NAME = "trm-jax/array_record/v1"
METADATA_FILE = "dataset.json"
IDENTIFIERS_FILE = "identifiers.json"
TEST_PUZZLES_FILE = "test_puzzles.json"
ARRAY_RECORD_OPTIONS = "group_size:1,zstd:3"
DEFAULT_EXAMPLES_PER_SHARD = 1 << 20
# The original's label value for "no loss here"; SPEC §7 turns ignore_label_id
# into this when batches are made.
IGNORE_LABEL = -100
# The raw puzzle files shipped with the project (ARC JSON, Sudoku lists), xz-compressed.
RAW_DATA_DIR = pathlib.Path(__file__).resolve().parent / "raw"


class DatasetFormatError(errors.UserError, ValueError):
  """A dataset directory or file does not hold what the format requires."""


@dataclasses.dataclass
class DatasetMetadata:
  """The metadata of one split (SPEC §7), as the original's dataset.json."""
  seq_len: int
  vocab_size: int
  pad_id: int
  ignore_label_id: int | None
  blank_identifier_id: int
  num_puzzle_identifiers: int
  total_groups: int
  mean_puzzle_examples: float
  total_puzzles: int
  sets: list[str]

  @classmethod
  def from_json_dict(cls, d: dict[str, Any], source: str) -> "DatasetMetadata":
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [n for n in names if n not in d]
    if missing:
      raise DatasetFormatError(f"{source}: missing field(s) {missing}; expected all of {names}")
    return cls(**{n: d[n] for n in names})

  def to_json_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def token_dtype_for(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8) if vocab_size <= 256 else np.dtype("<u2")


def shard_name(set_name: str, shard: int, num_shards: int) -> str:
  return f"{set_name}__examples-{shard:05d}-of-{num_shards:05d}.array_record"


def index_name(set_name: str) -> str:
  return f"{set_name}__index.npz"


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

  def finish_split(self, split: str, *, num_puzzle_identifiers: int, pad_id: int = 0,
                   ignore_label_id: int | None = 0, blank_identifier_id: int = 0,
                   mean_puzzle_examples: float | None = None,
                   extra: dict[str, Any] | None = None) -> DatasetMetadata:
    """Closes the split's sets and writes its dataset.json (totals over its sets)."""
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(obj, f)
  tmp.rename(path)


# ---------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class SetIndex:
  """Index arrays of one set (everything but the examples themselves)."""
  name: str
  puzzle_identifiers: np.ndarray  # [P] int32
  puzzle_indices: np.ndarray  # [P+1] int64
  group_indices: np.ndarray  # [G+1] int64
  shard_paths: list[pathlib.Path]
  num_examples: int

  @property
  def num_puzzles(self) -> int:
    return int(self.puzzle_identifiers.shape[0])

  @property
  def num_groups(self) -> int:
    return int(self.group_indices.shape[0]) - 1


@dataclasses.dataclass
class SplitInfo:
  path: pathlib.Path
  metadata: DatasetMetadata
  token_dtype: np.dtype
  sets: dict[str, SetIndex]


def load_split(split_dir: str | os.PathLike) -> SplitInfo:
  """Reads and validates a split's metadata and index arrays (not the examples)."""
  split_dir = pathlib.Path(split_dir)
  meta_path = split_dir / METADATA_FILE
  if not split_dir.is_dir():
    raise DatasetFormatError(f"dataset split directory {split_dir} does not exist")
  if not meta_path.is_file():
    raise DatasetFormatError(f"{meta_path}: missing (is {split_dir.parent} a dataset built by data_prep?)")
  try:
    with open(meta_path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetFormatError(f"{meta_path}: invalid JSON ({e})") from None
  if not isinstance(raw, dict):
    raise DatasetFormatError(f"{meta_path}: expected a JSON object")
  meta = DatasetMetadata.from_json_dict(raw, str(meta_path))
  info = raw.get("trm_jax")
  if not isinstance(info, dict) or info.get("format") != FORMAT_NAME:
    raise DatasetFormatError(
        f"{meta_path}: not in the {FORMAT_NAME} format (a dataset written by the original code? "
        f"import it with `python -m data_prep.convert import`)")
  sets = {}
  for set_name in meta.sets:
    idx_path = split_dir / index_name(set_name)
    if not idx_path.is_file():
      raise DatasetFormatError(f"{idx_path}: missing index file for set {set_name!r}")
    try:
      with np.load(idx_path) as z:
        for key in ("puzzle_identifiers", "puzzle_indices", "group_indices"):
          if key not in z.files:
            raise DatasetFormatError(f"{idx_path}: missing array {key!r}")
        pid, pidx, gidx = z["puzzle_identifiers"], z["puzzle_indices"], z["group_indices"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      if isinstance(e, DatasetFormatError):
        raise
      raise DatasetFormatError(f"{idx_path}: not a readable .npz index file ({e})") from None
    try:
      num_shards = int(info["num_shards"][set_name])
      num_examples = int(info["num_examples"][set_name])
    except (KeyError, TypeError, ValueError):
      raise DatasetFormatError(
          f"{meta_path}: trm_jax.num_shards / trm_jax.num_examples lack an integer for set {set_name!r}") from None
    shards = [split_dir / shard_name(set_name, i, num_shards) for i in range(num_shards)]
    for s in shards:
      if not s.is_file():
        raise DatasetFormatError(f"{s}: missing example shard of set {set_name!r}")
    if pidx.shape[0] != pid.shape[0] + 1 or pidx[0] != 0 or pidx[-1] != num_examples:
      raise DatasetFormatError(f"{idx_path}: puzzle_indices disagree with {num_examples} examples")
    if gidx.shape[0] < 1 or gidx[0] != 0 or gidx[-1] != pid.shape[0]:
      raise DatasetFormatError(f"{idx_path}: group_indices disagree with {pid.shape[0]} puzzles")
    sets[set_name] = SetIndex(set_name, pid, pidx, gidx, shards, num_examples)
  try:
    token_dtype = np.dtype(info["token_dtype"]) if isinstance(info.get("token_dtype"), str) else None
  except TypeError:
    token_dtype = None
  if token_dtype is None or token_dtype.kind != "u":
    raise DatasetFormatError(f"{meta_path}: trm_jax.token_dtype must name an unsigned integer dtype "
                             f"(e.g. '|u1'), got {info.get('token_dtype')!r}")
  return SplitInfo(split_dir, meta, token_dtype, sets)


class ExampleReader:
  """Random access to the examples of one set: ``reader[indices] -> (inputs, labels)``."""

  def __init__(self, split: SplitInfo, set_name: str):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    self._set = split.sets[set_name]
    self._seq_len = split.metadata.seq_len
    self._dtype = split.token_dtype
    self._readers = [array_record_module.ArrayRecordReader(str(p)) for p in self._set.shard_paths]
    counts = [r.num_records() for r in self._readers]
    self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if self._offsets[-1] != self._set.num_examples:
      raise DatasetFormatError(
          f"{split.path}: set {set_name!r} has {self._offsets[-1]} records, metadata says {self._set.num_examples}")

  def __len__(self) -> int:
    return int(self._offsets[-1])

  def __getitem__(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = np.empty((indices.shape[0], 2 * self._seq_len), self._dtype)
    shard = np.searchsorted(self._offsets, indices, side="right") - 1
    for s in np.unique(shard):
      where = np.nonzero(shard == s)[0]
      recs = self._readers[s].read((indices[where] - self._offsets[s]).tolist())
      for w, r in zip(where, recs):
        out[w] = np.frombuffer(r, self._dtype)
    return out[:, :self._seq_len], out[:, self._seq_len:]

  def close(self) -> None:
    for r in self._readers:
      r.close()


def input_path(path: str | os.PathLike) -> pathlib.Path:
  """``path``, or ``path.xz`` when only the xz-compressed file exists.

  The puzzle files the project ships (``data_prep/raw``) are xz-compressed;
  every reader takes the plain or the compressed name alike. A path found in
  neither form comes back unchanged, so that errors name what was asked for.
  """
  path = pathlib.Path(path)
  if not path.is_file() and path.suffix != ".xz":
    compressed = path.with_name(path.name + ".xz")
    if compressed.is_file():
      return compressed
  return path


def input_exists(path: str | os.PathLike) -> bool:
  """Whether ``path`` or its ``.xz`` form is a file."""
  return input_path(path).is_file()


def open_input(path: str | os.PathLike, **kwargs: Any):
  """Opens an input file for reading as text, decompressing ``.xz`` files."""
  path = input_path(path)
  if path.suffix == ".xz":
    return lzma.open(path, "rt", **kwargs)
  return open(path, "r", **kwargs)


def warn(msg: str) -> None:
  print(f"warning: {msg}", file=sys.stderr)


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
