"""SwiGLU MLP without biases (SPEC §1).

``swiglu`` runs as Pallas kernels (Triton lowering, see ``kernels/attention.py``
for why) behind a ``jax.custom_vjp``:

- forward: one kernel computes both projections of a row block and applies
  the gate, ``h = silu(x @ W_gate) * (x @ W_up)``, so the ``[N, 2I]``
  projection never reaches memory; a plain matmul computes ``h @ W_down``.
- backward: one kernel recomputes the gate and up projections, computes
  ``dh = dout @ W_down^T`` in the same loop over D, and writes ``h`` and
  ``d[gate, up]``; three plain matmuls give ``dx``, ``dW_gate_up`` and
  ``dW_down`` (weight gradients accumulated in float32).

The plain matmuls have nothing to fuse. By default (``matmul_impl="xla"``)
they are XLA dots (cuBLAS on GPU, which splits the long reduction of the
weight gradients, K = rows, across the chip); ``matmul_impl="pallas"`` runs
them as a tiled Pallas matmul kernel instead (no split-K: the weight-gradient
grid is only (D/128) x (2I/128) programs), kept for benchmarking the two.

Keeping the whole MLP of a row block on chip would need a ``[rows, D]``
float32 accumulator next to the ``[rows, I]`` tiles: with D = 512 (ARC, maze)
or 916 (the mlp_t variant over positions) that does not fit in registers, so
the hidden activation ``h`` (``[N, I]``, half the size of the projection) does
one round trip through memory. Rows, D and I are zero-padded to whole tiles
(Triton tiles are powers of two; zero rows and columns add nothing), so odd
widths such as 97 or 916 work.
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


# The down projection contracts over I (512 at D = 128, 1536 at D = 512), the
# longest contraction of the model. XLA:CPU sums a float32 dot of up to about
# 1k terms in one running sum, whose rounding error grows like sqrt(I); the
# original's float32 numbers come from the CPU sgemm under PyTorch, which sums
# blocks of at most ~192 terms and adds the block sums (measured: relative RMS
# error 2.4e-7 at I = 512 against XLA's 4.1e-7). In TRM's long recursions that
# made our float32 drift from float64 faster than the original's. On a CPU,
# float32 down projections therefore add partial dots over blocks of 128.
# Elsewhere nothing changes: GPU GEMMs accumulate alike in both
# implementations, and bfloat16's own rounding dwarfs the accumulation order.
DOWN_PROJECTION_BLOCK = 128


def _blocked_contraction(a: jax.Array) -> bool:
  return (a.dtype == jnp.float32 and a.shape[-1] > DOWN_PROJECTION_BLOCK
          and jax.default_backend() == "cpu")


def down_projection(h: jax.Array, w_IxD: jax.Array, precision: lax.Precision | None = None
                    ) -> jax.Array:
  """``h [..., I] @ w [I, D]`` in h's dtype, summed in blocks of I on a CPU in float32 (see above)."""
  if not _blocked_contraction(h):
    return jnp.dot(h, w_IxD, precision=precision)
  out = None
  for start in range(0, h.shape[-1], DOWN_PROJECTION_BLOCK):
    part = jnp.dot(h[..., start:start + DOWN_PROJECTION_BLOCK],
                   w_IxD[start:start + DOWN_PROJECTION_BLOCK], precision=precision)
    out = part if out is None else out + part
  return out


def swiglu_reference(x: jax.Array, w_gate_up_Dx2I: jax.Array, w_down_IxD: jax.Array) -> jax.Array:
  """(silu(g) * u) @ w_down with [g, u] = split(x @ w_gate_up, 2) over the last axis.

  Weights are stored ``[in, out]`` in float32 and cast to ``x.dtype`` at use.
  The down projection sums over I in blocks on a CPU in float32
  (``down_projection``).
  """
  dtype = x.dtype
  gate_up = jnp.dot(x, w_gate_up_Dx2I.astype(dtype))
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return down_projection(jax.nn.silu(gate) * up, w_down_IxD.astype(dtype))


# dot_general contraction patterns for 2-D tiles.
_A_B = ((1,), (0,))   # a @ b
_A_BT = ((1,), (1,))  # a @ b.T
_AT_B = ((0,), (0,))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class SwiGLUBlockSizes(kernels_lib.BlockSizes):
  """Launch parameters of ``swiglu`` (``config.model.kernel_params.swiglu``, ``swiglu_mlp_t``).

  The fused gate/up tiles are shrunk for small inputs; rows, D and I are
  zero-padded to multiples of them. The matmul tiles are shrunk to divide the
  padded extents.
  """
  block_rows: int = kernels_lib.tile(64)  # gate/up kernels: rows per program
  block_inter: int = kernels_lib.tile(64)  # gate/up kernels: columns of I per program
  block_width: int = kernels_lib.tile(64)  # gate/up kernels: step along D, the contraction
  matmul_impl: str = kernels_lib.choice("xla", ("xla", "pallas"))  # the plain matmuls: XLA dots or a Pallas kernel
  matmul_block_m: int = kernels_lib.tile(128)  # Pallas matmul tiles (matmul_impl="pallas")
  matmul_block_n: int = kernels_lib.tile(128)
  matmul_block_k: int = kernels_lib.tile(32)
  num_warps: int = kernels_lib.warps(4)  # forward gate/up kernel
  num_stages: int = kernels_lib.stages(3)
  num_warps_bwd: int = kernels_lib.warps(4)  # backward gate/up kernel
  num_stages_bwd: int = kernels_lib.stages(2)
  matmul_num_warps: int = kernels_lib.warps(8)  # Pallas matmul kernel
  matmul_num_stages: int = kernels_lib.stages(3)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: it is a custom_vjp nondiff arg)."""
  block_rows: int
  block_inter: int
  block_width: int
  matmul_impl: str
  matmul_blocks: tuple[int, int, int]
  params: pltriton.CompilerParams
  params_bwd: pltriton.CompilerParams
  matmul_params: pltriton.CompilerParams
  precision: lax.Precision | None
  interpret: bool


def _dot(a, b, contract, precision):
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _block_range(index, block: int):
  start = index * block
  if not isinstance(start, int):
    start = pl.multiple_of(start, block)
  return pl.ds(start, block)


def _tile(extent: int, preferred: int) -> int:
  """Largest power of two <= preferred that divides extent (>= 16 here)."""
  tile = preferred
  while extent % tile:
    tile //= 2
  return tile


# ----------------------------------------------------------------------------
# Kernels. Weights arrive cast to x's dtype and padded; W_gate_up is viewed as
# [D, 2, I] so one block holds the matching gate and up columns.
# ----------------------------------------------------------------------------


def _round(x, dtype):
  """Rounds a float32 accumulator to the input dtype, as the reference's dots do."""
  return x.astype(dtype).astype(jnp.float32)


def _gate_up_kernel(x_ref, w_gu_ref, h_ref, *, block_width: int, precision):
  """h = silu(x @ W_gate) * (x @ W_up) for one (row block, I block)."""
  dtype = x_ref.dtype

  def body(t, carry):
    gate, up = carry
    cols = _block_range(t, block_width)
    x = x_ref[:, cols]
    gate += _dot(x, w_gu_ref[cols, 0, :], _A_B, precision)
    up += _dot(x, w_gu_ref[cols, 1, :], _A_B, precision)
    return gate, up

  zeros = jnp.zeros(h_ref.shape, jnp.float32)
  gate, up = lax.fori_loop(0, x_ref.shape[1] // block_width, body, (zeros, zeros))
  gate, up = _round(gate, dtype), _round(up, dtype)
  h_ref[...] = (gate * jax.nn.sigmoid(gate) * up).astype(h_ref.dtype)


def _gate_up_backward_kernel(x_ref, dout_ref, w_gu_ref, w_down_ref, h_ref, dgu_ref, *,
                             block_width: int, precision):
  """Recomputes gate/up, computes dh = dout @ W_down^T; writes h and d[gate, up]."""
  dtype = x_ref.dtype

  def body(t, carry):
    gate, up, dh = carry
    cols = _block_range(t, block_width)
    x = x_ref[:, cols]
    gate += _dot(x, w_gu_ref[cols, 0, :], _A_B, precision)
    up += _dot(x, w_gu_ref[cols, 1, :], _A_B, precision)
    dh += _dot(dout_ref[:, cols], w_down_ref[:, cols], _A_BT, precision)
    return gate, up, dh

  zeros = jnp.zeros(h_ref.shape, jnp.float32)
  gate, up, dh = lax.fori_loop(0, x_ref.shape[1] // block_width, body, (zeros,) * 3)
  gate, up, dh = _round(gate, dtype), _round(up, dtype), _round(dh, dtype)
  sig = jax.nn.sigmoid(gate)
  silu = gate * sig
  h_ref[...] = (silu * up).astype(h_ref.dtype)
  # d silu(g) / dg = sig * (1 + g * (1 - sig)).
  dgu_ref[:, 0, :] = (dh * up * sig * (1.0 + gate * (1.0 - sig))).astype(dgu_ref.dtype)
  dgu_ref[:, 1, :] = (dh * silu).astype(dgu_ref.dtype)


def _matmul_kernel(a_ref, b_ref, out_ref, *, transpose_a: bool, transpose_b: bool,
                   block_k: int, num_k_blocks: int, precision):
  contract = ((0,) if transpose_a else (1,), (1,) if transpose_b else (0,))

  def body(t, acc):
    ks = _block_range(t, block_k)
    a = a_ref[ks, :] if transpose_a else a_ref[:, ks]
    b = b_ref[:, ks] if transpose_b else b_ref[ks, :]
    return acc + _dot(a, b, contract, precision)

  acc = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers (all operands already padded to whole tiles).
# ----------------------------------------------------------------------------


def _matmul(a, b, cfg: _Config, *, transpose_a=False, transpose_b=False, out_dtype=None):
  """a @ b (a stored [K, M] if transpose_a, b stored [N, K] if transpose_b).

  Accumulates in float32; the result has ``out_dtype`` (default: a's dtype).
  """
  out_dtype = out_dtype or a.dtype
  if cfg.matmul_impl == "xla":
    contract = ((0,) if transpose_a else (1,), (1,) if transpose_b else (0,))
    return _dot(a, b, contract, cfg.precision).astype(out_dtype)
  m, k = a.shape[::-1] if transpose_a else a.shape
  n = b.shape[0] if transpose_b else b.shape[1]
  block_m, block_n, block_k = (_tile(extent, pref)
                               for extent, pref in zip((m, n, k), cfg.matmul_blocks))
  a_spec = (pl.BlockSpec((k, block_m), lambda j, i: (0, i)) if transpose_a
            else pl.BlockSpec((block_m, k), lambda j, i: (i, 0)))
  b_spec = (pl.BlockSpec((block_n, k), lambda j, i: (j, 0)) if transpose_b
            else pl.BlockSpec((k, block_n), lambda j, i: (0, j)))
  return pl.pallas_call(
      functools.partial(_matmul_kernel, transpose_a=transpose_a, transpose_b=transpose_b,
                        block_k=block_k, num_k_blocks=k // block_k, precision=cfg.precision),
      grid=(n // block_n, m // block_m),
      in_specs=[a_spec, b_spec],
      out_specs=pl.BlockSpec((block_m, block_n), lambda j, i: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      compiler_params=cfg.matmul_params,
      interpret=cfg.interpret,
      name="trm_swiglu_matmul",
  )(a, b)


def _padded_operands(x, w_gate_up, w_down, cfg: _Config):
  """x as [rows, D] and the weights in x's dtype, all padded to whole tiles."""
  dtype = x.dtype
  width = x.shape[-1]
  inter = w_down.shape[0]
  rows = x.size // width
  padded_rows = kernels_lib.round_up(rows, cfg.block_rows)
  padded_width = kernels_lib.round_up(width, cfg.block_width)
  padded_inter = kernels_lib.round_up(inter, cfg.block_inter)
  x_p = kernels_lib.pad_axis(kernels_lib.pad_axis(x.reshape(rows, width), 1, padded_width),
                             0, padded_rows)
  w_gu = w_gate_up.astype(dtype).reshape(width, 2, inter)
  w_gu = kernels_lib.pad_axis(kernels_lib.pad_axis(w_gu, 2, padded_inter), 0, padded_width)
  w_d = w_down.astype(dtype)
  w_d = kernels_lib.pad_axis(kernels_lib.pad_axis(w_d, 1, padded_width), 0, padded_inter)
  return x_p, w_gu, w_d


def _forward(x, w_gate_up, w_down, cfg: _Config):
  x_p, w_gu, w_d = _padded_operands(x, w_gate_up, w_down, cfg)
  (padded_rows, padded_width), padded_inter = x_p.shape, w_d.shape[0]
  h = pl.pallas_call(
      functools.partial(_gate_up_kernel, block_width=cfg.block_width, precision=cfg.precision),
      grid=(padded_inter // cfg.block_inter, padded_rows // cfg.block_rows),
      in_specs=[pl.BlockSpec((cfg.block_rows, padded_width), lambda j, i: (i, 0)),
                pl.BlockSpec((padded_width, 2, cfg.block_inter), lambda j, i: (0, 0, j))],
      out_specs=pl.BlockSpec((cfg.block_rows, cfg.block_inter), lambda j, i: (i, j)),
      out_shape=jax.ShapeDtypeStruct((padded_rows, padded_inter), x.dtype),
      compiler_params=cfg.params,
      interpret=cfg.interpret,
      name="trm_swiglu_gate_up",
  )(x_p, w_gu)
  if cfg.matmul_impl == "xla" and _blocked_contraction(h):
    out = down_projection(h, w_d, cfg.precision)  # summed as the reference's
  else:
    out = _matmul(h, w_d, cfg)
  rows, width = x.size // x.shape[-1], x.shape[-1]
  return out[:rows, :width].reshape(x.shape)


def _backward(x, w_gate_up, w_down, dout, cfg: _Config):
  x_p, w_gu, w_d = _padded_operands(x, w_gate_up, w_down, cfg)
  (padded_rows, padded_width), padded_inter = x_p.shape, w_d.shape[0]
  rows, width = x.size // x.shape[-1], x.shape[-1]
  inter = w_down.shape[0]
  dout_p = kernels_lib.pad_axis(
      kernels_lib.pad_axis(dout.astype(x.dtype).reshape(rows, width), 1, padded_width),
      0, padded_rows)
  row_block = lambda j, i: (i, 0)
  h, dgu = pl.pallas_call(
      functools.partial(_gate_up_backward_kernel, block_width=cfg.block_width,
                        precision=cfg.precision),
      grid=(padded_inter // cfg.block_inter, padded_rows // cfg.block_rows),
      in_specs=[pl.BlockSpec((cfg.block_rows, padded_width), row_block),
                pl.BlockSpec((cfg.block_rows, padded_width), row_block),
                pl.BlockSpec((padded_width, 2, cfg.block_inter), lambda j, i: (0, 0, j)),
                pl.BlockSpec((cfg.block_inter, padded_width), lambda j, i: (j, 0))],
      out_specs=[pl.BlockSpec((cfg.block_rows, cfg.block_inter), lambda j, i: (i, j)),
                 pl.BlockSpec((cfg.block_rows, 2, cfg.block_inter), lambda j, i: (i, 0, j))],
      out_shape=[jax.ShapeDtypeStruct((padded_rows, padded_inter), x.dtype),
                 jax.ShapeDtypeStruct((padded_rows, 2, padded_inter), x.dtype)],
      compiler_params=cfg.params_bwd,
      interpret=cfg.interpret,
      name="trm_swiglu_gate_up_bwd",
  )(x_p, dout_p, w_gu, w_d)
  dgu = dgu.reshape(padded_rows, 2 * padded_inter)
  dx = _matmul(dgu, w_gu.reshape(padded_width, 2 * padded_inter), cfg, transpose_b=True)
  dw_gu = _matmul(x_p, dgu, cfg, transpose_a=True, out_dtype=jnp.float32)
  dw_d = _matmul(h, dout_p, cfg, transpose_a=True, out_dtype=jnp.float32)
  dx = dx[:rows, :width].reshape(x.shape)
  dw_gu = dw_gu.reshape(padded_width, 2, padded_inter)[:width, :, :inter]
  return (dx, dw_gu.reshape(width, 2 * inter).astype(w_gate_up.dtype),
          dw_d[:inter, :width].astype(w_down.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _swiglu(x, w_gate_up, w_down, cfg: _Config):
  return _forward(x, w_gate_up, w_down, cfg)


def _swiglu_fwd(x, w_gate_up, w_down, cfg: _Config):
  return _forward(x, w_gate_up, w_down, cfg), (x, w_gate_up, w_down)


def _swiglu_bwd(cfg: _Config, inputs, dout):
  return _backward(*inputs, dout, cfg)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def swiglu(x: jax.Array, w_gate_up_Dx2I: jax.Array, w_down_IxD: jax.Array, *,
           block_sizes: SwiGLUBlockSizes | None = None,
           precision: lax.Precision | None = None,
           interpret: bool | None = None) -> jax.Array:
  """Fused SwiGLU MLP; same math, dtypes and layouts as ``swiglu_reference``.

  Args:
    x: ``[..., D]`` float input (leading axes are flattened into rows).
    w_gate_up_Dx2I: ``[D, 2I]`` weights (gate columns first), cast to x's dtype.
    w_down_IxD: ``[I, D]`` weights, cast to x's dtype.
    block_sizes: tiles of the fused gate/up kernels, how the plain matmuls
      (down projection and the three backward matmuls) run and their tiles,
      and the Triton launch parameters (``None``: the defaults of
      ``SwiGLUBlockSizes``).
    precision: precision of the in-kernel dots (``None``: Triton's default, TF32
      for float32 inputs on GPU; ``lax.Precision.HIGHEST`` for IEEE float32).
    interpret: run in Pallas interpret mode; ``None``: only on a CPU backend.

  Returns:
    ``[..., D]`` in x's dtype; gradients w.r.t. the weights come back in the
    weights' dtype (float32), accumulated in float32.
  """
  op = "swiglu"
  kernels_lib.check_float_dtype(op, "x", x)
  for name, w in (("w_gate_up", w_gate_up_Dx2I), ("w_down", w_down_IxD)):
    kernels_lib.check_float_dtype(op, name, w)
    if w.ndim != 2:
      raise ValueError(f"{op}: {name} must be 2-D, got shape {w.shape}")
  if x.ndim == 0 or x.size == 0:
    raise ValueError(f"{op}: x must be a non-empty [..., D] array, got shape {x.shape}")
  width = x.shape[-1]
  inter = w_down_IxD.shape[0]
  if w_gate_up_Dx2I.shape != (width, 2 * inter) or w_down_IxD.shape != (inter, width):
    raise ValueError(f"{op}: with x [..., {width}] expected w_gate_up [D, 2I] and w_down "
                     f"[I, D] with D = {width}, got {w_gate_up_Dx2I.shape} and "
                     f"{w_down_IxD.shape}")
  bs = SwiGLUBlockSizes() if block_sizes is None else block_sizes
  if not isinstance(bs, SwiGLUBlockSizes):
    raise ValueError(f"{op}: block_sizes must be a SwiGLUBlockSizes, got {type(bs).__name__}")
  interpret = kernels_lib.resolve_interpret(interpret)
  cfg = _Config(
      block_rows=kernels_lib.fit_block(bs.block_rows, x.size // width),
      block_inter=kernels_lib.fit_block(bs.block_inter, inter),
      block_width=kernels_lib.fit_block(bs.block_width, width),
      matmul_impl=bs.matmul_impl,
      matmul_blocks=(bs.matmul_block_m, bs.matmul_block_n, bs.matmul_block_k),
      params=kernels_lib.compiler_params(bs.num_warps, bs.num_stages),
      params_bwd=kernels_lib.compiler_params(bs.num_warps_bwd, bs.num_stages_bwd),
      matmul_params=kernels_lib.compiler_params(bs.matmul_num_warps, bs.matmul_num_stages),
      precision=precision, interpret=interpret)
  return _swiglu(x, w_gate_up_Dx2I, w_down_IxD, cfg)
