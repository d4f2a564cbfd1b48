"""Fused residual add + RMSNorm without a learned scale (SPEC §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def residual_rms_norm_reference(x: jax.Array, residual: jax.Array, *, eps: float) -> jax.Array:
  """rms_norm(x + residual) over the last axis.

  The add happens in the input dtype (as the original's ``h + f(h)``); the
  normalisation in float32; the result is cast back to ``x.dtype``.
  """
  h = (x + residual).astype(jnp.float32)
  variance = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
  return (h * jax.lax.rsqrt(variance + eps)).astype(x.dtype)
