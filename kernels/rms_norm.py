"""Fused residual add + RMSNorm without a learned scale (SPEC §1).

``residual_rms_norm`` is a Pallas kernel (Triton lowering, see
``kernels/attention.py`` for why) behind a ``jax.custom_vjp``: one pass reads
``x`` and ``residual`` and writes the normalised sum; the backward pass
recomputes the sum and its statistics in float32 from the inputs (the output,
rounded to bf16, would be a lossy residual) and writes one gradient, shared by
both inputs.
Rows are flattened from the leading axes; the normalised axis is zero-padded
to a power of two (Triton tiles), which leaves the sum of squares unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from trm_jax import kernels as kernels_lib


def residual_rms_norm_reference(x: jax.Array, residual: jax.Array, *, eps: float) -> jax.Array:
  """rms_norm(x + residual) over the last axis.

  The add happens in the input dtype (as the original's ``h + f(h)``); the
  normalisation in float32 (float64 inputs stay float64: the reference mode
  ``model.forward_dtype="float64"``); the result is cast back to ``x.dtype``.
  """
  h = (x + residual).astype(jnp.promote_types(x.dtype, jnp.float32))
  variance = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
  return (h * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


MAX_WIDTH = 16384
# Elements per tile when block_rows is chosen automatically: a few KiB per
# input tile keeps a 4-warp program busy without spilling.
_AUTO_TILE_ELEMENTS = 4096


@dataclasses.dataclass(frozen=True)
class RMSNormBlockSizes(kernels_lib.BlockSizes):
  """Launch parameters of ``residual_rms_norm`` (``config.model.kernel_params.rms_norm``)."""
  block_rows: int = kernels_lib.tile(0, minimum=1, auto=True)  # rows per program; 0: ~4096 elements per tile
  num_warps: int = kernels_lib.warps(4)
  num_stages: int = kernels_lib.stages(1)


@dataclasses.dataclass(frozen=True)
class _Config:
  eps: float
  block_rows: int
  params: pltriton.CompilerParams
  interpret: bool


def _normalize(x_ref, residual_ref, width: int, eps: float):
  """(x + residual) in the input dtype, then float32 h and 1/rms per row."""
  h = (x_ref[...] + residual_ref[...]).astype(jnp.float32)
  # Padded columns are zero, so summing and dividing by the true width is the mean.
  inv_rms = lax.rsqrt(jnp.sum(h * h, axis=1) / width + eps)
  return h, inv_rms


def _forward_kernel(x_ref, residual_ref, out_ref, *, width: int, eps: float):
  h, inv_rms = _normalize(x_ref, residual_ref, width, eps)
  out_ref[...] = (h * inv_rms[:, None]).astype(out_ref.dtype)


def _backward_kernel(x_ref, residual_ref, dout_ref, dh_ref, *, width: int, eps: float):
  h, inv_rms = _normalize(x_ref, residual_ref, width, eps)
  normed = h * inv_rms[:, None]
  dout = dout_ref[...].astype(jnp.float32)
  # d/dh of h / rms(h): (dout - normed * mean(dout * normed)) / rms(h).
  proj = jnp.sum(dout * normed, axis=1) / width
  dh_ref[...] = (inv_rms[:, None] * (dout - normed * proj[:, None])).astype(dh_ref.dtype)


def _call(kernel, inputs, cfg: _Config, name: str):
  """Runs a row-wise kernel over ``[..., D]`` inputs; returns ``[..., D]``."""
  shape = inputs[0].shape
  width = shape[-1]
  rows = inputs[0].size // width
  padded_rows = kernels_lib.round_up(rows, cfg.block_rows)
  padded_width = kernels_lib.next_power_of_2(width)
  flat = [kernels_lib.pad_axis(kernels_lib.pad_axis(x.reshape(rows, width), 1, padded_width),
                               0, padded_rows) for x in inputs]
  spec = pl.BlockSpec((cfg.block_rows, padded_width), lambda i: (i, 0))
  out = pl.pallas_call(
      functools.partial(kernel, width=width, eps=cfg.eps),
      grid=(padded_rows // cfg.block_rows,),
      in_specs=[spec] * len(flat),
      out_specs=spec,
      out_shape=jax.ShapeDtypeStruct((padded_rows, padded_width), inputs[0].dtype),
      compiler_params=cfg.params,
      interpret=cfg.interpret,
      name=name,
  )(*flat)
  return out[:rows, :width].reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _residual_rms_norm(x, residual, cfg: _Config):
  return _call(_forward_kernel, [x, residual], cfg, "trm_residual_rms_norm_fwd")


def _residual_rms_norm_fwd(x, residual, cfg: _Config):
  return _residual_rms_norm(x, residual, cfg), (x, residual)


def _residual_rms_norm_bwd(cfg: _Config, inputs, dout):
  dh = _call(_backward_kernel, [*inputs, dout], cfg, "trm_residual_rms_norm_bwd")
  return dh, dh  # h = x + residual


_residual_rms_norm.defvjp(_residual_rms_norm_fwd, _residual_rms_norm_bwd)


def residual_rms_norm(x: jax.Array, residual: jax.Array, *, eps: float,
                      block_sizes: RMSNormBlockSizes | None = None,
                      interpret: bool | None = None) -> jax.Array:
  """Fused ``rms_norm(x + residual)``; same math and dtypes as the reference.

  Args:
    x, residual: same shape ``[..., D]`` and float dtype (D <= 16384).
    eps: added to the mean square.
    block_sizes: rows per program (a power of two; 0 picks about 4096
      elements per tile) and Triton launch parameters (``None``: the defaults
      of ``RMSNormBlockSizes``).
    interpret: run in Pallas interpret mode; ``None``: only on a CPU backend.

  Returns:
    ``[..., D]`` in x's dtype. Differentiable w.r.t. x and residual.
  """
  op = "residual_rms_norm"
  for name, a in (("x", x), ("residual", residual)):
    kernels_lib.check_float_dtype(op, name, a)
  if x.shape != residual.shape:
    raise ValueError(f"{op}: x and residual must have the same shape, got {x.shape} and "
                     f"{residual.shape}")
  if x.dtype != residual.dtype:
    raise ValueError(f"{op}: x and residual must have the same dtype, got {x.dtype} and "
                     f"{residual.dtype}")
  if x.ndim == 0 or not 1 <= x.shape[-1] <= MAX_WIDTH:
    raise ValueError(f"{op}: the last axis must hold 1 to {MAX_WIDTH} values, got shape "
                     f"{x.shape}")
  if x.size == 0:
    raise ValueError(f"{op}: empty input of shape {x.shape}")
  padded_width = kernels_lib.next_power_of_2(x.shape[-1])
  rows = x.size // x.shape[-1]
  bs = RMSNormBlockSizes() if block_sizes is None else block_sizes
  if not isinstance(bs, RMSNormBlockSizes):
    raise ValueError(f"{op}: block_sizes must be an RMSNormBlockSizes, got {type(bs).__name__}")
  block_rows = bs.block_rows or max(1, _AUTO_TILE_ELEMENTS // padded_width)
  block_rows = min(block_rows, kernels_lib.next_power_of_2(rows))
  interpret = kernels_lib.resolve_interpret(interpret)
  cfg = _Config(eps=float(eps), block_rows=block_rows,
                params=kernels_lib.compiler_params(bs.num_warps, bs.num_stages), interpret=interpret)
  return _residual_rms_norm(x, residual, cfg)
