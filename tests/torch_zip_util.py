"""Writes files in ``torch.save``'s zip format without torch (for tests).

The layout is the one torch 2.x writes (``<archive>/data.pkl``,
``<archive>/data/<key>``, ``<archive>/byteorder``, ``<archive>/version``);
the pickle names torch's globals (``torch._utils._rebuild_tensor_v2``,
``torch.FloatStorage``...) without importing them, so that tests can make
state dicts of any config, and hostile pickles, where torch is not installed.
Each array gets its own contiguous storage. torch 2.14.1's
``torch.load(path, weights_only=True, map_location="cpu")`` reads what
``write_state_dict`` writes, bfloat16 included (checked once by hand).
"""

import collections
import io
import pickle
import zipfile

import numpy as np

STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                 np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                 np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                 np.dtype(np.bool_): "BoolStorage"}


class Global:
  """Pickles as the global ``module.name`` (which need not be importable here)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # the pickler wants a callable in a REDUCE; this one is only ever written
    raise TypeError(f"{self.module}.{self.name} is a name to pickle, not to call")


class Call:
  """Pickles as ``module.name(*args)``: the REDUCE of a hostile or foreign pickle."""

  def __init__(self, module: str, name: str, *args):
    self.func, self.args = Global(module, name), args


class Storage:
  """A raw storage, pickled as torch's persistent id ('storage', type, key, location, numel)."""

  def __init__(self, key: str, type_name: str, numel: int, location: str):
    self.key, self.type_name, self.numel, self.location = key, type_name, numel, location


class Tensor:
  """A contiguous tensor over a whole ``Storage``."""

  def __init__(self, storage: Storage, shape: tuple[int, ...]):
    self.storage, self.shape = storage, shape


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """The pure-Python pickler: its ``save_global`` can be overridden."""

  def reducer_override(self, obj):
    if isinstance(obj, Global):
      return obj.name  # a string: "save as a global", through save_global below
    if isinstance(obj, Call):
      return obj.func, obj.args
    if isinstance(obj, Tensor):
      stride = tuple(int(np.prod(obj.shape[i + 1:])) for i in range(len(obj.shape)))
      return (Global("torch._utils", "_rebuild_tensor_v2"),
              (obj.storage, 0, obj.shape, stride, False, collections.OrderedDict()))
    return NotImplemented

  def save_global(self, obj, name=None):
    if isinstance(obj, Global):
      self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
      self.memoize(obj)
    else:
      super().save_global(obj, name)

  def persistent_id(self, obj):
    if isinstance(obj, Storage):
      return ("storage", Global("torch", obj.type_name), obj.key, obj.location, obj.numel)
    return None


def write_zip(path, pickled: bytes, storages: dict[str, bytes] | None = None, archive: str = "archive") -> None:
  """A torch-format zip of a ``data.pkl`` and raw storages."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{archive}/data.pkl", pickled)
    zf.writestr(f"{archive}/byteorder", "little")
    for key, raw in (storages or {}).items():
      zf.writestr(f"{archive}/data/{key}", raw)
    zf.writestr(f"{archive}/version", "3\n")


def dumps(obj) -> bytes:
  """``obj`` pickled (protocol 2, as torch.save), with ``Global``/``Call`` written as named."""
  buf = io.BytesIO()
  _Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def write_state_dict(path, arrays: dict[str, np.ndarray], *, bfloat16: tuple[str, ...] = (),
                     location: str = "cuda:0", archive: str = "archive") -> None:
  """``torch.save(OrderedDict(arrays))`` as torch writes it; names in ``bfloat16`` are stored as bfloat16.

  bfloat16 keeps the top 16 bits of each float32 (truncation): use values
  that bfloat16 represents exactly when comparing.
  """
  state, storages = collections.OrderedDict(), {}
  for i, (name, value) in enumerate(arrays.items()):
    value = np.ascontiguousarray(value)
    key = str(i)
    if name in bfloat16:
      raw = (np.asarray(value, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
      type_name = "BFloat16Storage"
    else:
      raw = value.astype(value.dtype.newbyteorder("<")).tobytes()
      type_name = STORAGE_NAMES[value.dtype]
    storages[key] = raw
    state[name] = Tensor(Storage(key, type_name, value.size, location), value.shape)
  write_zip(path, dumps(state), storages, archive)
