"""Reads ``torch.save`` state-dict files without torch.

The original saves ``torch.save(model.state_dict(), path)``: since torch 1.6
that is a zip archive holding ``<archive>/data.pkl`` (a pickle of the dict
whose tensors refer, through pickle "persistent ids", to raw storages),
``<archive>/data/<key>`` (each storage's bytes, uncompressed),
``<archive>/byteorder`` and version records. ``load`` reads it with the
standard library and numpy.

A pickle can run arbitrary code when loaded, so the unpickler here resolves
only what a state dict needs: ``collections.OrderedDict``, torch's tensor
rebuild functions (implemented here over numpy) and the storage-type names
(``torch.FloatStorage``, ``torch.BFloat16Storage``, ...). Any other global
(``os.system``, ``builtins.eval``, a class of the original code...) is
refused before anything is called, with a ``TorchFormatError`` naming the
file and the global. Views are bounds-checked against their storage; a
tensor that is its whole storage in order is a read-only array over the bytes
read, any other view (a slice, a transpose, a tied weight) gets its own copy.

bfloat16 tensors (the original keeps ``H_init``/``L_init`` in its forward
dtype) become float32 exactly; the other float and integer types keep their
dtype. The legacy pre-1.6 format is refused with a hint to re-save.
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import zipfile
import zlib
from typing import Any

import numpy as np

from trm_jax import errors

# torch's storage-type names -> (numpy dtype of the raw bytes, whether they are bfloat16 bits).
_STORAGE_DTYPES = {
    "FloatStorage": (np.float32, False),
    "DoubleStorage": (np.float64, False),
    "HalfStorage": (np.float16, False),
    "BFloat16Storage": (np.uint16, True),
    "LongStorage": (np.int64, False),
    "IntStorage": (np.int32, False),
    "ShortStorage": (np.int16, False),
    "CharStorage": (np.int8, False),
    "ByteStorage": (np.uint8, False),
    "BoolStorage": (np.bool_, False),
}

# What a tensor read here can be (bfloat16 became float32).
_TENSOR_DTYPES = {np.dtype(d) for d, bf16 in _STORAGE_DTYPES.values() if not bf16} | {np.dtype(np.float32)}

# The first bytes of a legacy (non-zip) torch.save file: a pickled magic number.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class TorchFormatError(errors.UserError, ValueError):
  """A file is not a state dict that ``load`` can read safely; the message names it."""


class _StorageType:
  """What the unpickler returns for ``torch.<Name>Storage``: the dtype of its bytes."""

  def __init__(self, name: str):
    self.name = name
    self.dtype, self.bfloat16 = _STORAGE_DTYPES[name]


class _Storage:
  """One raw storage of the archive, read on first use (views of it share the read)."""

  def __init__(self, archive: "_Archive", storage_type: _StorageType, key: str, numel: int):
    self.archive, self.type, self.key, self.numel = archive, storage_type, key, numel
    self._array: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self._array is None:
      dtype = np.dtype(self.type.dtype).newbyteorder(self.archive.byteorder)
      # The size is checked before reading: a hostile member cannot make us inflate more than it claims.
      size = self.archive.storage_size(self.key)
      if size != self.numel * dtype.itemsize:
        raise self.archive.error(f"storage {self.key!r} holds {size} bytes, its header says "
                                 f"{self.numel} x {dtype.itemsize}")
      self._array = np.frombuffer(self.archive.read_record(f"data/{self.key}"), dtype=dtype)
    return self._array


class _Archive:
  """The zip file, its record prefix and byte order."""

  def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str):
    self.path, self.zf, self.prefix = path, zf, prefix
    self.storages: dict[str, _Storage] = {}
    order = self.read_record("byteorder", b"little").decode("ascii", "replace").strip()
    if order not in ("little", "big"):
      raise self.error(f"byteorder record is {order!r}, expected 'little' or 'big'")
    self.byteorder = "<" if order == "little" else ">"

  def error(self, what: str) -> TorchFormatError:
    return TorchFormatError(f"{self.path}: {what}")

  def read_record(self, name: str, default: bytes | None = None) -> bytes:
    try:
      return self.zf.read(self.prefix + name)
    except KeyError:
      if default is not None:
        return default
      raise self.error(f"missing record {self.prefix + name!r} (truncated or not a torch.save file?)") from None

  def storage_size(self, key: str) -> int:
    name = f"{self.prefix}data/{key}"
    try:
      return self.zf.getinfo(name).file_size
    except KeyError:
      raise self.error(f"missing record {name!r} (truncated or not a torch.save file?)") from None


def _rebuild_tensor(archive: _Archive, storage: Any, offset: Any, size: Any, stride: Any,
                    requires_grad: Any = False, hooks: Any = None, metadata: Any = None) -> np.ndarray:
  """``torch._utils._rebuild_tensor_v2`` over numpy: a bounds-checked view, copied."""
  del requires_grad, metadata  # no meaning for numpy arrays
  ints = lambda t: isinstance(t, tuple) and all(isinstance(i, int) and i >= 0 for i in t)
  if not isinstance(storage, _Storage):
    raise archive.error(f"a tensor refers to {type(storage).__name__}, not a storage")
  if not (isinstance(offset, int) and offset >= 0 and ints(size) and ints(stride) and len(size) == len(stride)):
    raise archive.error(f"tensor of storage {storage.key!r} has a malformed view "
                        f"(offset {offset!r}, size {size!r}, stride {stride!r})")
  if hooks:
    raise archive.error(f"tensor of storage {storage.key!r} has backward hooks")
  if 0 in size:
    out = np.zeros(size, storage.type.dtype)
  else:
    data = storage.array()
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
      raise archive.error(f"tensor of storage {storage.key!r} (offset {offset}, size {list(size)}, stride "
                          f"{list(stride)}) runs past the storage's {data.size} elements")
    contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    if offset == 0 and stride == contiguous and last == data.size - 1:
      out = data.reshape(size)  # the whole storage in order: no copy
    else:
      item = data.itemsize
      out = np.array(np.lib.stride_tricks.as_strided(
          data[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False))
  if storage.type.bfloat16:  # bfloat16 is the top half of a float32
    out = (out.astype(np.uint32) << 16).view(np.float32)
  return out.astype(out.dtype.newbyteorder("="), copy=False)


def _rebuild_parameter(archive: _Archive, data: Any, requires_grad: Any = False, hooks: Any = None) -> Any:
  """``torch._utils._rebuild_parameter`` (a state dict saved with ``keep_vars=True``)."""
  del requires_grad
  if hooks:
    raise archive.error("a parameter has backward hooks")
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the globals of a state dict; everything else is refused."""

  def __init__(self, archive: _Archive, file: Any):
    super().__init__(file)
    self.archive = archive

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return lambda *args: _rebuild_tensor(self.archive, *args)
    if module == "torch._utils" and name == "_rebuild_parameter":
      return lambda *args: _rebuild_parameter(self.archive, *args)
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise self.archive.error(f"refused pickle global {module}.{name} (only tensors of real dtypes, their "
                             "storages and containers are read: a state dict needs nothing else, and other "
                             "globals can run code)")

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise self.archive.error(f"unexpected persistent id {str(pid)[:80]!r} (expected a storage)")
    _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise self.archive.error(f"storage {key!r} has type {storage_type!r}, not a torch storage type")
    if not (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_.]+", key) and ".." not in key):
      raise self.archive.error(f"malformed storage key {str(key)[:80]!r}")
    if not (isinstance(numel, int) and numel >= 0):
      raise self.archive.error(f"storage {key!r} has a malformed size {numel!r}")
    storage = self.archive.storages.get(key)
    if storage is None:
      storage = self.archive.storages[key] = _Storage(self.archive, storage_type, key, numel)
    elif storage.type.name != storage_type.name or storage.numel != numel:
      raise self.archive.error(f"storage {key!r} is used as two types or sizes")
    return storage


def one_line(error: Any, limit: int = 200) -> str:
  """An exception's text on one line, shortened: for messages that must stay one line."""
  text = " ".join(str(error).split())
  return text if len(text) <= limit else text[:limit] + "..."


def is_torch_file(path: str | os.PathLike) -> bool:
  """Whether the file looks like a ``torch.save`` file (zip with a ``data.pkl``, or legacy)."""
  try:
    with open(path, "rb") as f:
      head = f.read(16)
    if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
      return True
    if not zipfile.is_zipfile(path):
      return False
    with zipfile.ZipFile(path) as zf:
      return any(n.endswith("data.pkl") and n.count("/") == 1 for n in zf.namelist())
  except OSError:
    return False


def _describe(value: Any) -> str:
  """``a dict``, ``an int (5)``: what a pickle held instead of a tensor."""
  kind = type(value).__name__
  article = "an" if kind[0] in "aeiou" else "a"
  return f"{article} {kind} ({repr(value)[:40]})" if isinstance(value, (int, float, str)) else f"{article} {kind}"


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A ``torch.save``d state dict as ``{name: numpy array}`` (bfloat16 -> float32).

  Raises ``TorchFormatError`` (one line, naming the file) for anything else:
  not a zip, a truncated or corrupt archive, a refused pickle global, or a
  pickle whose top level is not a dict of names to tensors.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      head = f.read(16)
  except OSError as e:
    raise TorchFormatError(f"{path}: cannot read ({one_line(e.strerror or e)})") from None
  if head.startswith(b"\x80") and _LEGACY_MAGIC in head:
    raise TorchFormatError(f"{path}: saved in torch's legacy (pre-1.6) format, which this reader does not "
                           "read; re-save it with torch >= 1.6: torch.save(torch.load(f), f)")
  try:
    zf = zipfile.ZipFile(path)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise TorchFormatError(f"{path}: not a torch.save zip file, or truncated ({one_line(e)})") from None
  with zf:
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise TorchFormatError(f"{path}: a zip file but not a torch.save file (expected one '<archive>/data.pkl', "
                             f"found {len(pickles)})")
    try:
      archive = _Archive(path, zf, pickles[0][:-len("data.pkl")])
      with zf.open(pickles[0]) as f:
        state = _Unpickler(archive, f).load()
      if not isinstance(state, dict):
        raise archive.error(f"holds {_describe(state)}, not a state dict (a dict of names to tensors)")
      out = {}
      for name, value in state.items():
        if not isinstance(name, str):
          raise archive.error(f"has a key that is {_describe(name)}, not a weight name")
        if not isinstance(value, np.ndarray) or value.dtype not in _TENSOR_DTYPES:
          raise archive.error(f"entry {name!r} is {_describe(value)}, not a tensor (expected a state dict "
                              "as the original saves: names to tensors)")
        out[name] = value
      return out
    except TorchFormatError:
      raise
    except (zipfile.BadZipFile, EOFError, zlib.error, pickle.UnpicklingError) as e:
      raise TorchFormatError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {one_line(e)})") from None
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError, RecursionError,
            MemoryError) as e:
      raise TorchFormatError(f"{path}: not a readable state dict ({type(e).__name__}: {one_line(e)})") from None
