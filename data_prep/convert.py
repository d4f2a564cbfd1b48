"""Converts datasets between the original TRM layout (``.npy`` files) and ours.

The original layout (written by ``dataset/build_*_dataset.py`` of the original
code, for any task)::

  <root>/identifiers.json, <root>/test_puzzles.json (ARC only)
  <root>/<split>/dataset.json
  <root>/<split>/<set>__{inputs,labels,puzzle_identifiers,puzzle_indices,group_indices}.npy

Usage::

  python -m data_prep.convert import ORIGINAL_DIR OUR_DIR     # original -> trm-jax format
  python -m data_prep.convert export OUR_DIR ORIGINAL_DIR     # trm-jax format -> original

Both stream: ``import`` checks the ``.npy`` headers with ``np.load(mmap_mode="r")``,
reads the examples in windows of rows and writes one puzzle at a time;
``export`` reads examples in chunks and appends them to the ``.npy`` files. Both write into a temporary directory that is renamed into place at
the end, so a failed conversion leaves nothing behind.

Exactness: ``import`` keeps the original ``dataset.json`` values (the original
sudoku builder, for instance, writes ``total_puzzles`` = number of groups and
``mean_puzzle_examples`` = 1, which the trainer's step count depends on) and
records the original token dtypes, so ``export`` of an imported dataset
reproduces the original files: the same arrays (dtype, shape, bytes) and the
same JSON. Exporting a dataset built by trm-jax writes tokens as uint8 (what
every original builder writes) when the vocabulary fits in a byte, and the
index arrays as int32, as the original does.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
from typing import Any, Sequence

import numpy as np

from data_prep import common
from trm_jax import errors
from trm_jax import tasks

ARRAY_NAMES = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")
INDEX_DTYPE = np.dtype("<i4")
# The key order of the original's PuzzleDatasetMetadata (pydantic model_dump).
ORIGINAL_METADATA_KEYS = ("pad_id", "ignore_label_id", "blank_identifier_id", "vocab_size", "seq_len",
                          "num_puzzle_identifiers", "total_groups", "mean_puzzle_examples", "total_puzzles",
                          "sets")
TOP_LEVEL_FILES = (common.IDENTIFIERS_FILE, common.TEST_PUZZLES_FILE)
CHUNK_EXAMPLES = 16384


class ConvertError(errors.UserError, ValueError):
  """A dataset to convert is missing files or holds malformed ones."""


def _split_dirs(root: pathlib.Path) -> list[pathlib.Path]:
  if not root.is_dir():
    raise ConvertError(f"{root}: dataset directory not found")
  splits = sorted(p for p in root.iterdir() if p.is_dir() and (p / common.METADATA_FILE).is_file())
  if not splits:
    raise ConvertError(f"{root}: no split directory with a {common.METADATA_FILE} (expected e.g. "
                       f"{root}/train/{common.METADATA_FILE})")
  return splits


def _read_json_file(path: pathlib.Path) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise ConvertError(f"{path}: missing") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConvertError(f"{path}: invalid JSON ({e})") from None


def _copy_top_level_files(src: pathlib.Path, dst_tmp: pathlib.Path) -> None:
  if not (src / common.IDENTIFIERS_FILE).is_file():
    raise ConvertError(f"{src / common.IDENTIFIERS_FILE}: missing (every dataset has one)")
  for name in TOP_LEVEL_FILES:
    path = src / name
    if path.is_file():
      obj = _read_json_file(path)
      expected = list if name == common.IDENTIFIERS_FILE else dict
      if not isinstance(obj, expected):
        raise ConvertError(f"{path}: expected a JSON {'list' if expected is list else 'object'}")
      shutil.copyfile(path, dst_tmp / name)  # byte for byte


# ---------------------------------------------------------------------------
# Import: original -> ours.


class _NpyRows:
  """Rows of a 2-D C-order ``.npy`` file, read in windows with plain reads.

  The header comes from ``np.load(mmap_mode="r")``; the rows are read with
  ``readinto`` rather than through the memory map, because every page a map
  touches counts in the process's resident set (6.7 GB for ARC-AGI-1).
  """

  def __init__(self, path: pathlib.Path, mapped: np.memmap, window_rows: int):
    if mapped.ndim != 2 or not mapped.flags.c_contiguous:
      raise ConvertError(f"{path}: expected a 2-D array in C order, got shape {mapped.shape}")
    self.path = path
    self.shape = mapped.shape
    self.dtype = mapped.dtype
    self._offset = int(mapped.offset)
    self._window = max(int(window_rows), 1)
    self._file = open(path, "rb")
    self._lo = self._hi = 0
    self._buf = np.empty((0, self.shape[1]), self.dtype)

  def rows(self, a: int, b: int) -> np.ndarray:
    if not self._lo <= a <= b <= self._hi:
      lo, hi = a, min(self.shape[0], max(b, a + self._window))
      self._buf = np.empty((hi - lo, self.shape[1]), self.dtype)
      self._file.seek(self._offset + lo * self.shape[1] * self.dtype.itemsize)
      if self._file.readinto(memoryview(self._buf).cast("B")) != self._buf.nbytes:
        raise ConvertError(f"{self.path}: file ends before row {hi} of {self.shape[0]}")
      self._lo, self._hi = lo, hi
    return self._buf[a - self._lo:b - self._lo]

  def close(self) -> None:
    self._file.close()


def _load_original_set(split_dir: pathlib.Path, set_name: str, seq_len: int) -> dict[str, np.ndarray]:
  arrays = {}
  for name in ARRAY_NAMES:
    path = split_dir / f"{set_name}__{name}.npy"
    try:
      arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
      raise ConvertError(f"{path}: missing (set {set_name!r} of split {split_dir.name!r})") from None
    except ValueError as e:
      raise ConvertError(f"{path}: not a readable .npy array ({e})") from None
    if arrays[name].dtype.kind not in "iu":
      raise ConvertError(f"{path}: expected integers, got dtype {arrays[name].dtype}")
  inputs, labels = arrays["inputs"], arrays["labels"]
  where = f"{split_dir}/{set_name}__*.npy"
  if inputs.ndim != 2 or inputs.shape != labels.shape or inputs.shape[1] != seq_len:
    raise ConvertError(f"{where}: inputs {inputs.shape} and labels {labels.shape} must both be "
                       f"[num_examples, seq_len={seq_len}]")
  pid, pidx, gidx = arrays["puzzle_identifiers"], arrays["puzzle_indices"], arrays["group_indices"]
  if pid.ndim != 1 or pidx.shape != (pid.shape[0] + 1,):
    raise ConvertError(f"{where}: puzzle_indices {pidx.shape} must have one entry more than "
                       f"puzzle_identifiers {pid.shape}")
  if pidx[0] != 0 or pidx[-1] != inputs.shape[0] or np.any(np.diff(pidx) <= 0):
    raise ConvertError(f"{where}: puzzle_indices must rise strictly from 0 to {inputs.shape[0]} examples")
  if gidx.ndim != 1 or gidx.shape[0] < 1 or gidx[0] != 0 or gidx[-1] != pid.shape[0] or np.any(np.diff(gidx) <= 0):
    raise ConvertError(f"{where}: group_indices must rise strictly from 0 to {pid.shape[0]} puzzles")
  return arrays


def import_original(src: str | pathlib.Path, dst: str | pathlib.Path, *, task: str = "generic", overwrite: bool = False,
                    examples_per_shard: int = common.DEFAULT_EXAMPLES_PER_SHARD,
                    window_rows: int = CHUNK_EXAMPLES) -> None:
  """Writes the original-layout dataset ``src`` as a trm-jax dataset at ``dst``.

  ``task`` is recorded in its dataset.json (the original's files do not say
  which task they hold; see ``trm_jax.tasks``).
  """
  if task not in tasks.TASKS:
    raise ConvertError(f"--task={task!r}: expected one of {tuple(tasks.TASKS)}")
  src = pathlib.Path(src)
  splits = _split_dirs(src)
  metas = {}
  for split_dir in splits:
    meta = _read_json_file(split_dir / common.METADATA_FILE)
    if not isinstance(meta, dict):
      raise ConvertError(f"{split_dir / common.METADATA_FILE}: expected a JSON object")
    try:
      common.DatasetMetadata.from_json_dict(meta, str(split_dir / common.METADATA_FILE))
    except common.DatasetFormatError as e:
      raise ConvertError(str(e)) from None
    if "trm_jax" in meta:
      raise ConvertError(f"{split_dir / common.METADATA_FILE}: already in the trm-jax format")
    metas[split_dir.name] = meta

  with common.DatasetWriter(dst, overwrite=overwrite, examples_per_shard=examples_per_shard) as ds:
    for split_dir in splits:
      meta = metas[split_dir.name]
      dtypes = {}
      for set_name in meta["sets"]:
        arrays = _load_original_set(split_dir, set_name, int(meta["seq_len"]))
        dtypes[set_name] = {k: arrays[k].dtype.str for k in ("inputs", "labels")}
        writer = ds.set_writer(split_dir.name, set_name, int(meta["seq_len"]), int(meta["vocab_size"]))
        pidx = np.array(arrays["puzzle_indices"], np.int64)
        gidx = np.array(arrays["group_indices"], np.int64)
        pid = np.array(arrays["puzzle_identifiers"], np.int64)
        readers = [_NpyRows(split_dir / f"{set_name}__{k}.npy", arrays.pop(k), window_rows)
                   for k in ("inputs", "labels")]
        try:
          for g in range(gidx.shape[0] - 1):
            for p in range(gidx[g], gidx[g + 1]):
              a, b = int(pidx[p]), int(pidx[p + 1])
              try:
                writer.add_puzzle(readers[0].rows(a, b), readers[1].rows(a, b), int(pid[p]))
              except ValueError as e:
                raise ConvertError(f"{split_dir}/{set_name}__inputs.npy / __labels.npy: puzzle {p}: {e}") from None
            writer.end_group()
        finally:
          for r in readers:
            r.close()
      ds.finish_split(split_dir.name, task=task, num_puzzle_identifiers=int(meta["num_puzzle_identifiers"]),
                      extra={"source": {"converted_from": "original", "original_token_dtypes": dtypes}})
      # Keep the original's metadata values as they are.
      ours = _read_json_file(ds.tmp_dir / split_dir.name / common.METADATA_FILE)
      ds.write_json(f"{split_dir.name}/{common.METADATA_FILE}", {**meta, "trm_jax": ours["trm_jax"]})
    _copy_top_level_files(src, ds.tmp_dir)


# ---------------------------------------------------------------------------
# Export: ours -> original.


def _as_index(arr: np.ndarray, what: str) -> np.ndarray:
  if arr.size and (arr.min() < np.iinfo(INDEX_DTYPE).min or arr.max() > np.iinfo(INDEX_DTYPE).max):
    raise ConvertError(f"{what}: values do not fit the original's int32")
  return arr.astype(INDEX_DTYPE)


def export_original(src: str | pathlib.Path, dst: str | pathlib.Path, *, overwrite: bool = False,
                    chunk_examples: int = CHUNK_EXAMPLES) -> None:
  """Writes the trm-jax dataset ``src`` in the original ``.npy`` layout at ``dst``."""
  src = pathlib.Path(src)
  splits = _split_dirs(src)
  infos = {}
  for split_dir in splits:
    try:
      infos[split_dir.name] = common.load_split(split_dir)
    except common.DatasetFormatError as e:
      raise ConvertError(str(e)) from None

  with common.DatasetWriter(dst, overwrite=overwrite) as ds:
    for split_dir in splits:
      info = infos[split_dir.name]
      raw = _read_json_file(split_dir / common.METADATA_FILE)
      trm = raw.pop("trm_jax")
      original_dtypes = (trm.get("source") or {}).get("original_token_dtypes", {})
      out_dir = ds.tmp_dir / split_dir.name
      out_dir.mkdir()
      for set_name, s in info.sets.items():
        reader = common.ExampleReader(info, set_name)
        files = []
        try:
          shape = (s.num_examples, info.metadata.seq_len)
          dtypes = []
          for k in ("inputs", "labels"):
            default = np.uint8 if info.metadata.vocab_size <= 256 else info.token_dtype
            dtypes.append(np.dtype(original_dtypes.get(set_name, {}).get(k, default)))
            files.append(open(out_dir / f"{set_name}__{k}.npy", "wb"))
            # The header np.save writes for this dtype and shape.
            np.lib.format.write_array_header_1_0(files[-1], {
                "descr": np.lib.format.dtype_to_descr(dtypes[-1]), "fortran_order": False, "shape": shape})
          for a in range(0, s.num_examples, chunk_examples):
            b = min(a + chunk_examples, s.num_examples)
            for f, dtype, rows in zip(files, dtypes, reader[np.arange(a, b)]):
              f.write(np.ascontiguousarray(rows, dtype).tobytes())
        finally:
          for f in files:
            f.close()
          reader.close()
        where = f"{split_dir}/{common.index_name(set_name)}"
        np.save(out_dir / f"{set_name}__puzzle_identifiers.npy", _as_index(s.puzzle_identifiers, where))
        np.save(out_dir / f"{set_name}__puzzle_indices.npy", _as_index(s.puzzle_indices, where))
        np.save(out_dir / f"{set_name}__group_indices.npy", _as_index(s.group_indices, where))
      ordered = {k: raw[k] for k in ORIGINAL_METADATA_KEYS if k in raw}
      ordered.update({k: v for k, v in raw.items() if k not in ordered})
      with open(out_dir / common.METADATA_FILE, "w") as f:
        json.dump(ordered, f)
    _copy_top_level_files(src, ds.tmp_dir)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m data_prep.convert",
      description="Convert a dataset between the original TRM .npy layout and the trm-jax format.")
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="original layout -> trm-jax format")
  imp.add_argument("src", help="dataset directory written by the original code")
  imp.add_argument("dst", help="trm-jax dataset directory to create")
  exp = sub.add_parser("export", help="trm-jax format -> original layout")
  exp.add_argument("src", help="trm-jax dataset directory")
  exp.add_argument("dst", help="original-layout directory to create")
  imp.add_argument("--task", default="generic",
                   help=f"the task the data is for, recorded in dataset.json: one of {tuple(tasks.TASKS)} "
                        "(default %(default)s: no task-specific drawing or prediction)")
  for q in (imp, exp):
    q.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
  args = p.parse_args(argv)
  try:
    if args.command == "import":
      import_original(args.src, args.dst, task=args.task, overwrite=args.overwrite)
    else:
      export_original(args.src, args.dst, overwrite=args.overwrite)
  except (ConvertError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{args.command}: {args.src} -> {args.dst}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
