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
"""

from __future__ import annotations

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


def check_block(op: str, name: str, value: int, minimum: int = MIN_DOT_DIM) -> int:
  """Triton needs power-of-two tiles, and ``tl.dot`` tiles of at least 16."""
  if not isinstance(value, int) or not is_power_of_2(value) or value < minimum:
    raise ValueError(f"{op}: {name} must be a power of two >= {minimum}, got {value!r}")
  return value


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


def check_float_dtype(op: str, name: str, x: jax.Array) -> None:
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")


def compiler_params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
  """The Triton launch parameters (ignored in interpret mode)."""
  if not is_power_of_2(num_warps):
    raise ValueError(f"num_warps must be a power of two, got {num_warps!r}")
  if num_stages < 1:
    raise ValueError(f"num_stages must be >= 1, got {num_stages!r}")
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
