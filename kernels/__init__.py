"""Pallas kernels for TRM's hot path, and what they share.

Each module holds a plain-jnp ``*_reference`` (the definition of the math) and
a fused Pallas version behind a ``jax.custom_vjp`` with the same signature.
The kernels target the Pallas Triton lowering (see ``kernels/attention.py``
for why); on a CPU backend they run in Pallas interpret mode, so the whole
package can be tested without a GPU.

The helpers below encode the Triton lowering's rules that interpret mode does
not check: every array a kernel loads, stores or multiplies must have a
power-of-two number of elements, ``tl.dot`` operands need every dimension to
be at least 16, and (in jax 0.11.2) partial edge blocks are not masked, so
every blocked axis is padded to a whole number of blocks before the call.

Each op's launch parameters (tile sizes, Triton's ``num_warps`` and
``num_stages``) are one frozen ``BlockSizes`` dataclass (as jax's own Pallas
kernels' ``BlockSizes``): data a config can set per task
(``config.model.kernel_params``, see ``trm_jax.ops``) and a sweep can report,
validated when built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

# Smallest extent of any dimension of a ``tl.dot`` operand on NVIDIA GPUs.
MIN_DOT_DIM = 16

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def resolve_interpret(interpret: bool | None) -> bool:
  """``None`` means: interpret on a CPU backend, compile with Triton otherwise."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def is_power_of_2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def next_power_of_2(n: int) -> int:
  return 1 if n <= 1 else 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def fit_block(block: int, extent: int) -> int:
  """Shrinks a power-of-two ``block`` for a small ``extent`` (never below 16).

  Avoids padding a 10-row input to 64 rows; the result stays a power of two.
  """
  return max(MIN_DOT_DIM, min(block, next_power_of_2(extent)))


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads ``axis`` of ``x`` at the end up to ``size`` (no-op if equal)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


class BlockSizeError(ValueError):
  """A launch parameter out of range; keeps the field, so a config can name its own key."""

  def __init__(self, owner: str, field: str, value: Any, expected: str):
    self.field, self.value, self.expected = field, value, expected
    super().__init__(f"{owner}.{field}={value!r}: expected {expected}")


def tile(default: int, minimum: int = MIN_DOT_DIM, *, auto: bool = False):
  """A tile size field: a power of two >= ``minimum`` (``auto``: or 0, the op picks)."""
  return dataclasses.field(default=default, metadata={"kind": "power_of_2", "minimum": minimum, "auto": auto})


def warps(default: int):
  """Triton's ``num_warps``: a power of two."""
  return dataclasses.field(default=default, metadata={"kind": "power_of_2", "minimum": 1, "auto": False})


def stages(default: int):
  """Triton's ``num_stages`` (software-pipelining depth): a positive integer."""
  return dataclasses.field(default=default, metadata={"kind": "positive"})


def choice(default: str, choices: tuple[str, ...]):
  """A field with a fixed set of values (e.g. which implementation a part uses)."""
  return dataclasses.field(default=default, metadata={"kind": "choice", "choices": choices})


def _expected(field: dataclasses.Field) -> str | None:
  """What the field's rule accepts, or None for an unchecked field."""
  meta = field.metadata
  if meta.get("kind") == "power_of_2":
    return f"a power of two >= {meta['minimum']}" + (" or 0 (automatic)" if meta["auto"] else "")
  if meta.get("kind") == "positive":
    return "a positive integer"
  if meta.get("kind") == "choice":
    return f"one of {meta['choices']}"
  return None


def _accepts(field: dataclasses.Field, value: Any) -> bool:
  meta = field.metadata
  if meta.get("kind") == "choice":
    return value in meta["choices"]
  if not isinstance(value, int) or isinstance(value, bool):
    return False
  if meta.get("kind") == "power_of_2":
    return (meta["auto"] and value == 0) or (is_power_of_2(value) and value >= meta["minimum"])
  return value >= 1


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Base of each op's launch parameters: checks every field when built.

  Subclasses declare their fields with ``tile``, ``warps``, ``stages`` and
  ``choice``, whose defaults are the op's defaults. Hashable, so an op can
  pass it as a static argument.
  """

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if _expected(field) is not None and not _accepts(field, value):
        raise BlockSizeError(type(self).__name__, field.name, value, _expected(field))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str | None = None) -> "BlockSizes":
    """Builds from a mapping of field names (missing ones keep their defaults); raises naming an
    unknown key or a bad value as ``<where>.<key>`` (default: the class name)."""
    where = where or cls.__name__
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
      raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {names}")
    try:
      return cls(**values)
    except BlockSizeError as e:
      raise BlockSizeError(where, e.field, e.value, e.expected) from None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def check_float_dtype(op: str, name: str, x: jax.Array) -> None:
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def compiler_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
  """The Triton launch parameters (ignored in interpret mode), checked by the op's ``BlockSizes``."""
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
