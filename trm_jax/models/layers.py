"""The layers of TRM's one small network ``f`` (SPEC §1).

Parameters are float32 and are cast to the forward dtype at each use (as the
original's ``CastedLinear``). Linear weights are stored ``[in, out]`` (JAX
convention; the original's ``[out, in]`` is transposed on import/export, see
``trm_jax.weights``). There are no biases. The hot-path ops (attention,
residual + RMSNorm, SwiGLU) go through ``trm_jax.ops``, which picks the XLA or
the Pallas implementation.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from trm_jax import ops


def _truncated_std_factor(lower: float = -2.0, upper: float = 2.0) -> float:
  """The std of a standard normal truncated to [lower, upper]."""
  z = (math.erf(upper / math.sqrt(2)) - math.erf(lower / math.sqrt(2))) / 2
  pdf = lambda x: math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
  return math.sqrt(1 - (upper * pdf(upper) - lower * pdf(lower)) / z - ((pdf(upper) - pdf(lower)) / z) ** 2)


def trunc_normal(std: float) -> nn.initializers.Initializer:
  """Normal truncated at ±2 (in units of the untruncated std), rescaled so its std is ``std``.

  As the original's ``trunc_normal_init_`` (which mirrors JAX's variance
  scaling): note that ``jax.nn.initializers.truncated_normal(stddev)`` does not
  rescale, its std is 0.88 * stddev.
  """
  scale = std / _truncated_std_factor()

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32) * scale).astype(dtype)
  return init


def lecun_trunc_normal(fan_in: int) -> nn.initializers.Initializer:
  """``trunc_normal`` with std 1/sqrt(fan_in), the init of every linear weight."""
  return trunc_normal(1.0 / math.sqrt(fan_in))


def swiglu_intermediate_size(width: int, expansion: float) -> int:
  """The original's width rule: ceil_to_multiple(round(expansion * width * 2/3), 256).

  ``round`` is Python's (banker's rounding), as in the original.
  """
  inter = round(expansion * width * 2 / 3)
  return -(-inter // 256) * 256


def rope_tables(num_positions: int, head_dim: int, theta: float, dtype=jnp.float32
                ) -> tuple[jax.Array, jax.Array]:
  """cos/sin ``[S+P, head_dim]`` for the half-split RoPE layout.

  float32 as the original; float64 for the reference mode ``forward_dtype="float64"``.
  """
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=dtype) / head_dim))
  angles = jnp.outer(jnp.arange(num_positions, dtype=dtype), inv_freq)
  emb = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class SwiGLU(nn.Module):
  """Bias-free SwiGLU over the last axis: (silu(g) * u) @ W_down, [g, u] = x @ W_gate_up.

  With ``over_first_axis`` it acts on the first axis of a 2-D ``[width, N]``
  input instead (same parameters, same numbers; see ``ops.swiglu_axis0``).
  """
  width: int
  expansion: float
  kernels: str = "xla"
  over_first_axis: bool = False
  kernel_params: ops.KernelParams = ops.DEFAULT_PARAMS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    inter = swiglu_intermediate_size(self.width, self.expansion)
    w_gate_up_Wx2I = self.param("gate_up_proj", lecun_trunc_normal(self.width), (self.width, 2 * inter))
    w_down_IxW = self.param("down_proj", lecun_trunc_normal(inter), (inter, self.width))
    if self.over_first_axis:
      return ops.swiglu_axis0(x, w_gate_up_Wx2I, w_down_IxW, impl=self.kernels, params=self.kernel_params)
    return ops.swiglu(x, w_gate_up_Wx2I, w_down_IxW, impl=self.kernels, params=self.kernel_params)


class Attention(nn.Module):
  """Bidirectional multi-head attention; RoPE on q and k when cos/sin are given."""
  hidden_size: int
  num_heads: int
  kernels: str = "xla"
  remat: bool = False  # recompute the attention op in the backward pass instead of storing its internals
  kernel_params: ops.KernelParams = ops.DEFAULT_PARAMS

  @nn.compact
  def __call__(self, h_BxSxD: jax.Array, cos_SxK: jax.Array | None, sin_SxK: jax.Array | None) -> jax.Array:
    batch, seq, dim = h_BxSxD.shape
    # As the original: head dim D // H, so the inner width H * hd may be less
    # than D when H does not divide D (the baseline's 12 heads at 512: 504).
    head_dim = dim // self.num_heads
    inner = self.num_heads * head_dim
    dtype = h_BxSxD.dtype
    w_qkv_Dx3I = self.param("qkv_proj", lecun_trunc_normal(dim), (dim, 3 * inner))
    w_o_IxD = self.param("o_proj", lecun_trunc_normal(inner), (inner, dim))
    qkv = jnp.dot(h_BxSxD.reshape(batch * seq, dim), w_qkv_Dx3I.astype(dtype)).reshape(
        batch, seq, 3 * self.num_heads, head_dim)
    q, k, v = jnp.split(qkv, 3, axis=2)  # each [B, S, H, K], in the original's order
    attention = functools.partial(ops.attention, impl=self.kernels, params=self.kernel_params)
    if self.remat:
      # With kernels="xla" the [B, H, S, S] softmax is the largest activation
      # the backward pass would keep; recomputing it keeps only q, k and v.
      attention = jax.checkpoint(attention)
    out_BxSxHxK = attention(q, k, v, cos_SxK, sin_SxK)
    return jnp.dot(out_BxSxHxK.reshape(batch * seq, inner), w_o_IxD.astype(dtype)).reshape(batch, seq, dim)


class Block(nn.Module):
  """Post-norm block: token mixing (attention or mlp_t), then the channel SwiGLU.

  The activations are ``[B, S, D]`` with attention and ``[S, B, D]`` with
  mlp_t: the mixing over positions is then two plain matrix products on
  ``[S, B*D]`` (no transposes, forward or backward), and the channel SwiGLU
  and its RMSNorm act on the last axis either way. ``ReasoningModule``
  changes the layout once per application of the network.
  """
  hidden_size: int
  num_heads: int
  expansion: float
  mlp_t: bool
  num_positions: int  # S + P, the width of the mlp_t SwiGLU
  rms_norm_eps: float
  kernels: str = "xla"
  remat_attention: bool = False
  kernel_params: ops.KernelParams = ops.DEFAULT_PARAMS

  @nn.compact
  def __call__(self, h: jax.Array, cos_SxK: jax.Array | None, sin_SxK: jax.Array | None) -> jax.Array:
    if self.mlp_t:
      # Mix over positions: the SwiGLU and the RMSNorm act on the position axis (the first).
      h_SxBxD = h
      seq, batch, dim = h_SxBxD.shape
      mixed_SxN = SwiGLU(self.num_positions, self.expansion, self.kernels, over_first_axis=True,
                         kernel_params=self.kernel_params, name="mlp_t")(h_SxBxD.reshape(seq, batch * dim))
      h = ops.residual_rms_norm_axis0(h_SxBxD, mixed_SxN.reshape(seq, batch, dim), eps=self.rms_norm_eps,
                                      impl=self.kernels, params=self.kernel_params)
    else:
      attn = Attention(self.hidden_size, self.num_heads, self.kernels, self.remat_attention,
                       kernel_params=self.kernel_params, name="self_attn")(h, cos_SxK, sin_SxK)
      h = ops.residual_rms_norm(h, attn, eps=self.rms_norm_eps, impl=self.kernels, params=self.kernel_params)
    mlp = SwiGLU(self.hidden_size, self.expansion, self.kernels, kernel_params=self.kernel_params, name="mlp")(h)
    return ops.residual_rms_norm(h, mlp, eps=self.rms_norm_eps, impl=self.kernels, params=self.kernel_params)


class ReasoningModule(nn.Module):
  """``f(h, inj)``: ``h + inj`` through ``num_layers`` blocks (the original's ``L_level``/``H_level``).

  ``inj=None`` applies the blocks to ``h`` alone (TRM-singlez's answer update).
  """
  num_layers: int
  hidden_size: int
  num_heads: int
  expansion: float
  mlp_t: bool
  num_positions: int
  rms_norm_eps: float
  kernels: str = "xla"
  remat_attention: bool = False
  kernel_params: ops.KernelParams = ops.DEFAULT_PARAMS

  @nn.compact
  def __call__(self, h_BxSxD: jax.Array, inj_BxSxD: jax.Array | None,
               cos_SxK: jax.Array | None, sin_SxK: jax.Array | None) -> jax.Array:
    if inj_BxSxD is not None:
      h_BxSxD = h_BxSxD + inj_BxSxD
    if self.mlp_t:
      # mlp_t blocks work in [S, B, D] (see Block): one layout change here
      # and one back, instead of transposes around every mixing product.
      h_BxSxD = jnp.swapaxes(h_BxSxD, 0, 1)
    for i in range(self.num_layers):
      h_BxSxD = Block(self.hidden_size, self.num_heads, self.expansion, self.mlp_t, self.num_positions,
                      self.rms_norm_eps, self.kernels, self.remat_attention, self.kernel_params,
                      name=f"layers_{i}")(h_BxSxD, cos_SxK, sin_SxK)
    if self.mlp_t:
      h_BxSxD = jnp.swapaxes(h_BxSxD, 0, 1)
    return h_BxSxD
