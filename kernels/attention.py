"""Bidirectional multi-head attention (SPEC §1), optionally with RoPE fused in.

Layout: q, k, v are ``[B, S, H, K]`` (batch, sequence, heads, head dim), the
layout the qkv projection produces; the output has the same layout.

``attention`` is a flash-style Pallas kernel (online softmax over key blocks,
statistics in float32, logsumexp saved for a backward pass that recomputes the
probabilities) behind a ``jax.custom_vjp``; ``attention_reference`` is the
plain-jnp definition it is tested against.

Lowering (the choice made for all of ``kernels/``): Pallas *Triton*
(``pl.pallas_call`` with ``jax.experimental.pallas.triton.CompilerParams``,
same name and fields in jax 0.11.2 and 0.12), not Mosaic GPU. TRM's shapes are
small and awkward for Mosaic GPU's Hopper path: head dims 8 to 64 (16 to 128
bytes per bf16 row, below or at the edge of its swizzled shared-memory tiles
and 64-row warpgroup matmuls), odd sequence lengths (97, 916) and a float32
mode would all need special cases, its API is still moving (about 1,600 changed
lines in its core, lowering and primitives modules between 0.11.2 and 0.12, new
deprecations), and its explicit pipelines, barriers and layouts cannot be
checked without a GPU. The Triton lowering takes plain blocked array code that
Pallas interpret mode executes faithfully on a CPU, and Triton itself emits
Hopper's wgmma and software pipelining for the tile matmuls: lowered on a CPU
host with jax 0.11.2 and compiled offline for sm_90 with Triton 3.6, every
kernel with a matmul uses wgmma, every kernel fits in shared memory and (at the
default launch parameters, bf16 and f32) does not spill. Its costs: a
DeprecationWarning at lowering time in jax >= 0.11, and Triton's rules, which
interpret mode does not check and the code therefore enforces itself:
power-of-two tiles of at least 16 (head dims are padded, per RoPE half when the
halves are separate tiles) and no partial edge blocks (sequences are
zero-padded to whole blocks; padded keys are masked in the forward pass, padded
query rows dropped). ``tests/kernels/test_triton_lowering.py`` lowers every
kernel for CUDA on a CPU-only host to keep this checked.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from trm_jax import kernels as kernels_lib

def apply_rope(x_BxSxHxK: jax.Array, cos_SxK: jax.Array, sin_SxK: jax.Array) -> jax.Array:
  """RoPE with the half-split layout, computed in float32 (float64 stays float64), cast back."""
  dtype = x_BxSxHxK.dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  x = x_BxSxHxK.astype(compute)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos_SxK[None, :, None, :].astype(compute)
  sin = sin_SxK[None, :, None, :].astype(compute)
  return (x * cos + rotated * sin).astype(dtype)


def attention_reference(q_BxSxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                        cos_SxK: jax.Array | None = None, sin_SxK: jax.Array | None = None,
                        *, sm_scale: float | None = None) -> jax.Array:
  """Plain-jnp attention: softmax(q k^T * scale) v, logits and softmax in float32 (or float64)."""
  if (cos_SxK is None) != (sin_SxK is None):
    raise ValueError("attention: pass both cos and sin for RoPE, or neither")
  if cos_SxK is not None:
    q_BxSxHxK = apply_rope(q_BxSxHxK, cos_SxK, sin_SxK)
    k_BxSxHxK = apply_rope(k_BxSxHxK, cos_SxK, sin_SxK)
  if sm_scale is None:
    sm_scale = q_BxSxHxK.shape[-1] ** -0.5
  compute = jnp.promote_types(q_BxSxHxK.dtype, jnp.float32)
  logits_BxHxSxS = jnp.einsum("bqhk,bshk->bhqs", q_BxSxHxK, k_BxSxHxK,
                              preferred_element_type=compute) * sm_scale
  probs_BxHxSxS = jax.nn.softmax(logits_BxHxSxS, axis=-1).astype(v_BxSxHxK.dtype)
  out = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxSxS, v_BxSxHxK,
                   preferred_element_type=compute)
  return out.astype(q_BxSxHxK.dtype)


_LOG2_E = math.log2(math.e)
MAX_HEAD_DIM = 64

# dot_general contraction patterns for 2-D tiles.
_A_B = ((1,), (0,))   # a @ b
_A_BT = ((1,), (1,))  # a @ b.T
_AT_B = ((0,), (0,))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class AttentionBlockSizes(kernels_lib.BlockSizes):
  """Launch parameters of ``attention`` (``config.model.kernel_params.attention``).

  Tiles are shrunk for short sequences; the sequence is zero-padded to a
  multiple of each.
  """
  block_q: int = kernels_lib.tile(64)  # forward: query rows per program
  block_k: int = kernels_lib.tile(64)  # forward: keys per step of the online softmax
  block_q_bwd: int = kernels_lib.tile(64)  # backward: query rows per step (dk/dv) or program (dq)
  block_k_bwd: int = kernels_lib.tile(64)  # backward: keys per program (dk/dv) or step (dq)
  num_warps: int = kernels_lib.warps(4)  # forward kernel
  num_stages: int = kernels_lib.stages(3)
  num_warps_bwd: int = kernels_lib.warps(8)  # both backward kernels
  num_stages_bwd: int = kernels_lib.stages(2)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static settings of one call (hashable: it is a custom_vjp nondiff arg)."""
  sm_scale: float
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  params: pltriton.CompilerParams
  params_bwd: pltriton.CompilerParams
  precision: lax.Precision | None
  interpret: bool


# ----------------------------------------------------------------------------
# Head-dim layout. Triton's dot wants tiles of >= 16 (power-of-two) columns.
# Plain layout: the head dim is zero-padded at the end. Split layout (the
# forward pass with RoPE): each half is padded separately, so that the kernel
# can load the two halves as separate tiles (rotate_half pairs column c with
# column c + K/2; Triton cannot concatenate tiles) and the zero columns stay
# out of the dot products.
# ----------------------------------------------------------------------------


def _plain_width(head_dim: int) -> int:
  return max(kernels_lib.MIN_DOT_DIM, kernels_lib.next_power_of_2(head_dim))


def _split_half_width(head_dim: int) -> int:
  return max(kernels_lib.MIN_DOT_DIM, kernels_lib.next_power_of_2(head_dim // 2))


def _pad_head(x: jax.Array, split: bool) -> jax.Array:
  head_dim = x.shape[-1]
  if not split:
    return kernels_lib.pad_axis(x, x.ndim - 1, _plain_width(head_dim))
  half, half_padded = head_dim // 2, _split_half_width(head_dim)
  if half == half_padded:
    return x
  halves = kernels_lib.pad_axis(x.reshape(*x.shape[:-1], 2, half), x.ndim, half_padded)
  return halves.reshape(*x.shape[:-1], 2 * half_padded)


def _pad(x: jax.Array, seq: int, split: bool = False) -> jax.Array:
  """[B, S, H, K] -> [B, seq, H, padded K], zero-padded."""
  return kernels_lib.pad_axis(_pad_head(x, split), 1, seq)


def _unpad(x: jax.Array, seq_len: int, head_dim: int) -> jax.Array:
  """Inverse of ``_pad`` for the plain layout."""
  return x[:, :seq_len, :, :head_dim]


# ----------------------------------------------------------------------------
# In-kernel helpers.
# ----------------------------------------------------------------------------


def _dot(a: jax.Array, b: jax.Array, contract, precision) -> jax.Array:
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def _block_rows(index, block: int):
  """``pl.ds`` of block ``index``; tells Triton the start is block-aligned."""
  start = index * block
  if not isinstance(start, int):
    start = pl.multiple_of(start, block)
  return pl.ds(start, block)


def _load_halves(x_ref, rows) -> tuple[jax.Array, jax.Array]:
  half = x_ref.shape[-1] // 2
  return x_ref[rows, pl.ds(0, half)], x_ref[rows, pl.ds(half, half)]


def _load_rotated_halves(x_ref, cos_ref, sin_ref) -> tuple[jax.Array, jax.Array]:
  """RoPE of a whole [rows, K] block, as its lower and upper halves.

  Computed in float32 and cast back to the input dtype, exactly as
  ``apply_rope``: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x_hi, x_lo].
  """
  lo, hi = _load_halves(x_ref, slice(None))
  dtype = lo.dtype
  lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  cos_lo, cos_hi = _load_halves(cos_ref, slice(None))
  sin_lo, sin_hi = _load_halves(sin_ref, slice(None))
  return (lo * cos_lo - hi * sin_lo).astype(dtype), (hi * cos_hi + lo * sin_hi).astype(dtype)


def _logits(q_tiles, k_tiles, precision) -> jax.Array:
  """q . k^T in float32, summed over matching tiles (the halves, if split)."""
  logits = _dot(q_tiles[0], k_tiles[0], _A_BT, precision)
  for q_tile, k_tile in zip(q_tiles[1:], k_tiles[1:]):
    logits += _dot(q_tile, k_tile, _A_BT, precision)
  return logits


# ----------------------------------------------------------------------------
# Kernels. Grids are (sequence block, head, batch): the sequence block is the
# fastest-varying launch index, so programs that share K/V run together.
# Softmax statistics are kept in base 2 (exp2 is the native instruction):
# lse2 = log2(sum(exp2(logits * log2(e)))).
#
# RoPE: the forward kernel rotates its q block itself (once per program, from
# the matching rows of the cos/sin tables). k is rotated beforehand by XLA:
# every q block reads every k block, so rotating k inside the kernel would
# repeat the rotation, and the table reads, S / block_q times. The backward
# kernels take the rotated q and k (each is read by every block of the other)
# and return gradients w.r.t. them; RoPE's VJP maps those back outside.
# ----------------------------------------------------------------------------


def _forward_kernel(*refs, rope: bool, seq_len: int, block_k: int, num_k_blocks: int,
                    scale_log2: float, precision):
  if rope:
    q_ref, cos_ref, sin_ref, k_ref, v_ref, out_ref, lse2_ref = refs
    q_tiles = _load_rotated_halves(q_ref, cos_ref, sin_ref)
  else:
    q_ref, k_ref, v_ref, out_ref, lse2_ref = refs
    q_tiles = (q_ref[...],)
  block_q = q_ref.shape[0]

  def step(j, carry, mask_padded_keys: bool):
    acc, row_max, row_sum = carry
    k_rows = _block_rows(j, block_k)
    k_tiles = _load_halves(k_ref, k_rows) if rope else (k_ref[k_rows, :],)
    v = v_ref[k_rows, :]
    logits2 = _logits(q_tiles, k_tiles, precision) * scale_log2
    if mask_padded_keys:
      key_ids = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
      logits2 = jnp.where((key_ids < seq_len)[None, :], logits2, -jnp.inf)
    new_max = jnp.maximum(row_max, jnp.max(logits2, axis=1))
    correction = jnp.exp2(row_max - new_max)
    probs = jnp.exp2(logits2 - new_max[:, None])
    row_sum = row_sum * correction + jnp.sum(probs, axis=1)
    acc = acc * correction[:, None] + _dot(probs.astype(v.dtype), v, _A_B, precision)
    return acc, new_max, row_sum

  carry = (jnp.zeros((block_q, v_ref.shape[-1]), jnp.float32),
           jnp.full((block_q,), -jnp.inf, jnp.float32),
           jnp.zeros((block_q,), jnp.float32))
  # Whole key blocks need no mask; only the last one can hold padded keys.
  num_whole = seq_len // block_k
  if num_whole:
    carry = lax.fori_loop(0, num_whole, functools.partial(step, mask_padded_keys=False), carry)
  if num_whole < num_k_blocks:
    carry = step(num_whole, carry, mask_padded_keys=True)
  acc, row_max, row_sum = carry
  out_ref[...] = (acc / row_sum[:, None]).astype(out_ref.dtype)
  lse2_ref[...] = row_max + jnp.log2(row_sum)


def _probs_and_dlogits(q, k, v, do, lse2, delta, scale_log2, precision):
  """Recomputed softmax probabilities and d loss / d logits (unscaled)."""
  probs = jnp.exp2(_dot(q, k, _A_BT, precision) * scale_log2 - lse2[:, None])
  dprobs = _dot(do, v, _A_BT, precision)
  dlogits = probs * (dprobs - delta[:, None])
  return probs, dlogits.astype(q.dtype)


# In the backward kernels padded rows need no mask: padded keys have k = v = 0
# and their dk/dv rows are dropped; padded query rows have do = 0, delta = 0
# and lse = 0, so they add nothing to dk/dv and their dq rows are dropped.


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dk_ref, dv_ref, *,
                 block_q: int, num_q_blocks: int, sm_scale: float, scale_log2: float,
                 precision):
  k = k_ref[...]
  v = v_ref[...]

  def body(i, carry):
    dk, dv = carry
    q_rows = _block_rows(i, block_q)
    q = q_ref[q_rows, :]
    do = do_ref[q_rows, :]
    probs, dlogits = _probs_and_dlogits(q, k, v, do, lse2_ref[q_rows], delta_ref[q_rows],
                                        scale_log2, precision)
    dv += _dot(probs.astype(do.dtype), do, _AT_B, precision)
    dk += _dot(dlogits, q, _AT_B, precision)
    return dk, dv

  dk, dv = lax.fori_loop(0, num_q_blocks, body, (jnp.zeros(k.shape, jnp.float32),
                                                 jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse2_ref, delta_ref, dq_ref, *, block_k: int,
               num_k_blocks: int, sm_scale: float, scale_log2: float, precision):
  q = q_ref[...]
  do = do_ref[...]
  lse2 = lse2_ref[...]
  delta = delta_ref[...]

  def body(j, dq):
    k_rows = _block_rows(j, block_k)
    k = k_ref[k_rows, :]
    _, dlogits = _probs_and_dlogits(q, k, v_ref[k_rows, :], do, lse2, delta, scale_log2,
                                    precision)
    return dq + _dot(dlogits, k, _A_B, precision)

  dq = lax.fori_loop(0, num_k_blocks, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------
# pallas_call wrappers.
# ----------------------------------------------------------------------------


def _seq_block_spec(block: int, width: int) -> pl.BlockSpec:
  """[B, S, H, W] array, one sequence block of one (batch, head)."""
  return pl.BlockSpec((None, block, None, width), lambda s, h, b: (b, s, h, 0))


def _seq_full_spec(seq: int, width: int) -> pl.BlockSpec:
  """[B, S, H, W] array, the whole (padded) sequence of one (batch, head)."""
  return pl.BlockSpec((None, seq, None, width), lambda s, h, b: (b, 0, h, 0))


def _forward(q, k, v, cos, sin, cfg: _Config):
  """Returns the output [B, S, H, K] and lse2 [B, H, S] (base-2 logsumexp)."""
  batch, seq_len, heads, head_dim = q.shape
  rope = cos is not None
  seq_q = kernels_lib.round_up(seq_len, cfg.block_q)
  seq_k = kernels_lib.round_up(seq_len, cfg.block_k)
  if rope:
    k = apply_rope(k, cos, sin)
  q_p, k_p, v_p = _pad(q, seq_q, rope), _pad(k, seq_k, rope), _pad(v, seq_k)
  width_qk, width_v = q_p.shape[-1], v_p.shape[-1]
  args, in_specs = [q_p], [_seq_block_spec(cfg.block_q, width_qk)]
  if rope:
    # float32, laid out like q, the rows of a q block per program.
    for table in (cos, sin):
      args.append(kernels_lib.pad_axis(_pad_head(table.astype(jnp.float32), True), 0, seq_q))
      in_specs.append(pl.BlockSpec((cfg.block_q, width_qk), lambda s, h, b: (s, 0)))
  args += [k_p, v_p]
  in_specs += [_seq_full_spec(seq_k, width_qk), _seq_full_spec(seq_k, width_v)]
  kernel = functools.partial(
      _forward_kernel, rope=rope, seq_len=seq_len, block_k=cfg.block_k,
      num_k_blocks=seq_k // cfg.block_k, scale_log2=cfg.sm_scale * _LOG2_E,
      precision=cfg.precision)
  out_p, lse2_p = pl.pallas_call(
      kernel,
      grid=(seq_q // cfg.block_q, heads, batch),
      in_specs=in_specs,
      out_specs=[_seq_block_spec(cfg.block_q, width_v),
                 pl.BlockSpec((None, None, cfg.block_q), lambda s, h, b: (b, h, s))],
      out_shape=[jax.ShapeDtypeStruct((batch, seq_q, heads, width_v), q.dtype),
                 jax.ShapeDtypeStruct((batch, heads, seq_q), jnp.float32)],
      compiler_params=cfg.params,
      interpret=cfg.interpret,
      name="trm_attention_fwd",
  )(*args)
  return _unpad(out_p, seq_len, head_dim), lse2_p[:, :, :seq_len]


def _backward(q, k, v, out, lse2, do, cfg: _Config):
  """dq, dk, dv for (already RoPE-rotated, if RoPE is on) q and k."""
  batch, seq_len, heads, head_dim = q.shape
  block_q, block_k = cfg.block_q_bwd, cfg.block_k_bwd
  seq_q = kernels_lib.round_up(seq_len, block_q)
  seq_k = kernels_lib.round_up(seq_len, block_k)
  # delta = rowsum(dP * P) = rowsum(dO * O), the softmax-backward correction.
  delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = kernels_lib.pad_axis(jnp.swapaxes(delta, 1, 2), 2, seq_q)
  lse2 = kernels_lib.pad_axis(lse2, 2, seq_q)
  q_p, k_p, v_p, do_p = _pad(q, seq_q), _pad(k, seq_k), _pad(v, seq_k), _pad(do, seq_q)
  width = q_p.shape[-1]
  args = [q_p, k_p, v_p, do_p, lse2, delta]
  stats_full = pl.BlockSpec((None, None, seq_q), lambda s, h, b: (b, h, 0))
  stats_block = pl.BlockSpec((None, None, block_q), lambda s, h, b: (b, h, s))
  statics = dict(sm_scale=cfg.sm_scale, scale_log2=cfg.sm_scale * _LOG2_E,
                 precision=cfg.precision)

  dk_p, dv_p = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=block_q, num_q_blocks=seq_q // block_q,
                        **statics),
      grid=(seq_k // block_k, heads, batch),
      in_specs=[_seq_full_spec(seq_q, width), _seq_block_spec(block_k, width),
                _seq_block_spec(block_k, width), _seq_full_spec(seq_q, width),
                stats_full, stats_full],
      out_specs=[_seq_block_spec(block_k, width)] * 2,
      out_shape=[jax.ShapeDtypeStruct(k_p.shape, k.dtype),
                 jax.ShapeDtypeStruct(v_p.shape, v.dtype)],
      compiler_params=cfg.params_bwd,
      interpret=cfg.interpret,
      name="trm_attention_bwd_dkdv",
  )(*args)

  dq_p = pl.pallas_call(
      functools.partial(_dq_kernel, block_k=block_k, num_k_blocks=seq_k // block_k,
                        **statics),
      grid=(seq_q // block_q, heads, batch),
      in_specs=[_seq_block_spec(block_q, width), _seq_full_spec(seq_k, width),
                _seq_full_spec(seq_k, width), _seq_block_spec(block_q, width),
                stats_block, stats_block],
      out_specs=_seq_block_spec(block_q, width),
      out_shape=jax.ShapeDtypeStruct(q_p.shape, q.dtype),
      compiler_params=cfg.params_bwd,
      interpret=cfg.interpret,
      name="trm_attention_bwd_dq",
  )(*args)
  return tuple(_unpad(g, seq_len, head_dim) for g in (dq_p, dk_p, dv_p))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, cos, sin, cfg: _Config):
  return _forward(q, k, v, cos, sin, cfg)[0]


def _attention_fwd(q, k, v, cos, sin, cfg: _Config):
  out, lse2 = _forward(q, k, v, cos, sin, cfg)
  return out, (q, k, v, cos, sin, out, lse2)


def _attention_bwd(cfg: _Config, residuals, do):
  q, k, v, cos, sin, out, lse2 = residuals
  if cos is None:
    dq, dk, dv = _backward(q, k, v, out, lse2, do, cfg)
    return dq, dk, dv, None, None
  # Rotate q and k once (an elementwise op that XLA fuses), run the plain
  # backward on them, and map the gradients back with RoPE's own VJP, which
  # also gives exact cos/sin gradients (XLA drops that part when unused).
  q_rot, rope_vjp_q = jax.vjp(apply_rope, q, cos, sin)
  k_rot, rope_vjp_k = jax.vjp(apply_rope, k, cos, sin)
  dq_rot, dk_rot, dv = _backward(q_rot, k_rot, v, out, lse2, do, cfg)
  dq, dcos_q, dsin_q = rope_vjp_q(dq_rot)
  dk, dcos_k, dsin_k = rope_vjp_k(dk_rot)
  return dq, dk, dv, dcos_q + dcos_k, dsin_q + dsin_k


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q_BxSxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
              cos_SxK: jax.Array | None = None, sin_SxK: jax.Array | None = None,
              *, sm_scale: float | None = None,
              block_sizes: AttentionBlockSizes | None = None,
              precision: lax.Precision | None = None,
              interpret: bool | None = None) -> jax.Array:
  """Fused attention; same math, dtypes and layout as ``attention_reference``.

  Args:
    q_BxSxHxK, k_BxSxHxK, v_BxSxHxK: same shape and float dtype; head dim <= 64.
    cos_SxK, sin_SxK: RoPE tables (both or neither; half-split layout, float32
      math, like ``apply_rope``). The forward kernel rotates q itself; k is
      rotated once by XLA beforehand (each k block is read by every q block).
    sm_scale: softmax scale; default ``K ** -0.5``.
    block_sizes: tile sizes and Triton launch parameters (``None``: the
      defaults of ``AttentionBlockSizes``).
    precision: precision of the in-kernel dots (``None``: Triton's default, TF32
      for float32 inputs on GPU; ``lax.Precision.HIGHEST`` for IEEE float32).
    interpret: run in Pallas interpret mode; ``None``: only on a CPU backend.

  Returns:
    ``[B, S, H, K]`` in q's dtype. Differentiable w.r.t. every input.
  """
  op = "attention"
  for name, x in (("q", q_BxSxHxK), ("k", k_BxSxHxK), ("v", v_BxSxHxK)):
    if x.ndim != 4:
      raise ValueError(f"{op}: {name} must be [B, S, H, K], got shape {x.shape}")
    kernels_lib.check_float_dtype(op, name, x)
  if not q_BxSxHxK.shape == k_BxSxHxK.shape == v_BxSxHxK.shape:
    raise ValueError(f"{op}: q, k and v must have the same shape, got {q_BxSxHxK.shape}, "
                     f"{k_BxSxHxK.shape} and {v_BxSxHxK.shape}")
  if not q_BxSxHxK.dtype == k_BxSxHxK.dtype == v_BxSxHxK.dtype:
    raise ValueError(f"{op}: q, k and v must have the same dtype, got {q_BxSxHxK.dtype}, "
                     f"{k_BxSxHxK.dtype} and {v_BxSxHxK.dtype}")
  _, seq_len, _, head_dim = q_BxSxHxK.shape
  if not 1 <= head_dim <= MAX_HEAD_DIM:
    raise ValueError(f"{op}: head dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
  if (cos_SxK is None) != (sin_SxK is None):
    raise ValueError(f"{op}: pass both cos and sin for RoPE, or neither")
  if cos_SxK is not None:
    for name, table in (("cos", cos_SxK), ("sin", sin_SxK)):
      if table.shape != (seq_len, head_dim):
        raise ValueError(f"{op}: {name} must have shape (S, K) = {(seq_len, head_dim)}, "
                         f"got {table.shape}")
      kernels_lib.check_float_dtype(op, name, table)
    if head_dim % 2:
      raise ValueError(f"{op}: RoPE needs an even head dim, got {head_dim}")
  bs = AttentionBlockSizes() if block_sizes is None else block_sizes
  if not isinstance(bs, AttentionBlockSizes):
    raise ValueError(f"{op}: block_sizes must be an AttentionBlockSizes, got {type(bs).__name__}")
  blocks = {name: kernels_lib.fit_block(getattr(bs, name), seq_len)
            for name in ("block_q", "block_k", "block_q_bwd", "block_k_bwd")}
  interpret = kernels_lib.resolve_interpret(interpret)
  cfg = _Config(
      sm_scale=float(head_dim ** -0.5 if sm_scale is None else sm_scale),
      params=kernels_lib.compiler_params(bs.num_warps, bs.num_stages),
      params_bwd=kernels_lib.compiler_params(bs.num_warps_bwd, bs.num_stages_bwd),
      precision=precision, interpret=interpret, **blocks)
  return _attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, cos_SxK, sin_SxK, cfg)
