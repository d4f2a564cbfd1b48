"""The on-disk dataset format: what ``data_prep`` writes and ``trm_jax`` reads.

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

``dataset.json["trm_jax"]["task"]`` names the task the data is for
(``trm_jax.tasks``: how to draw it, what ``--mode=predict`` does); datasets
built before it was recorded have none.

The writers live in ``data_prep.common`` (only the builders write); this
module holds what both sides need: the names, the metadata, the format
errors, the reader, and the atomic JSON write. ``trm_jax`` never imports
``data_prep``; ``data_prep`` imports this.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import pathlib
import sys
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
  # ``dataset.json["trm_jax"]["task"]``; None for a dataset built before tasks were recorded.
  task: str | None = None
  # ``dataset.json["trm_jax"]["source"]["builder"]`` (e.g. "data_prep.arc"), when recorded.
  builder: str | None = None


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
  task = info.get("task")
  if task is not None and not (isinstance(task, str) and task):
    raise DatasetFormatError(f"{meta_path}: trm_jax.task must be a task name (a string), got {task!r}")
  source = info.get("source")
  builder = source.get("builder") if isinstance(source, dict) else None
  return SplitInfo(split_dir, meta, token_dtype, sets, task, builder if isinstance(builder, str) else None)


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
