"""Bidirectional multi-head attention (SPEC §1), optionally with RoPE fused in.

Layout: q, k, v are ``[B, S, H, K]`` (batch, sequence, heads, head dim), the
layout the qkv projection produces; the output has the same layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x_BxSxHxK: jax.Array, cos_SxK: jax.Array, sin_SxK: jax.Array) -> jax.Array:
  """RoPE with the half-split layout, computed in float32, cast back."""
  dtype = x_BxSxHxK.dtype
  x = x_BxSxHxK.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos_SxK[None, :, None, :].astype(jnp.float32)
  sin = sin_SxK[None, :, None, :].astype(jnp.float32)
  return (x * cos + rotated * sin).astype(dtype)


def attention_reference(q_BxSxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                        cos_SxK: jax.Array | None = None, sin_SxK: jax.Array | None = None,
                        *, sm_scale: float | None = None) -> jax.Array:
  """Plain-jnp attention: softmax(q k^T * scale) v, logits and softmax in float32."""
  if (cos_SxK is None) != (sin_SxK is None):
    raise ValueError("attention: pass both cos and sin for RoPE, or neither")
  if cos_SxK is not None:
    q_BxSxHxK = apply_rope(q_BxSxHxK, cos_SxK, sin_SxK)
    k_BxSxHxK = apply_rope(k_BxSxHxK, cos_SxK, sin_SxK)
  if sm_scale is None:
    sm_scale = q_BxSxHxK.shape[-1] ** -0.5
  logits_BxHxSxS = jnp.einsum("bqhk,bshk->bhqs", q_BxSxHxK, k_BxSxHxK,
                              preferred_element_type=jnp.float32) * sm_scale
  probs_BxHxSxS = jax.nn.softmax(logits_BxHxSxS, axis=-1).astype(v_BxSxHxK.dtype)
  out = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxSxS, v_BxSxHxK,
                   preferred_element_type=jnp.float32)
  return out.astype(q_BxSxHxK.dtype)
