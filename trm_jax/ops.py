"""The one place that picks an implementation for each hot-path op.

``impl`` is the config string ``model.kernels``: ``"xla"`` (plain jnp, the
default) or ``"pallas"`` (the fused kernels of ``kernels/``). An unknown
value raises.
"""

from __future__ import annotations

import jax

from kernels import attention as attention_lib
from kernels import rms_norm as rms_norm_lib
from kernels import swiglu as swiglu_lib

IMPLEMENTATIONS = ("xla", "pallas")


def check_impl(impl: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.kernels must be one of {IMPLEMENTATIONS}, got {impl!r}")
  return impl


def attention(q_BxSxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
              cos_SxK: jax.Array | None = None, sin_SxK: jax.Array | None = None,
              *, impl: str = "xla") -> jax.Array:
  if check_impl(impl) == "pallas":
    return attention_lib.attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, cos_SxK, sin_SxK)
  return attention_lib.attention_reference(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, cos_SxK, sin_SxK)


def residual_rms_norm(x: jax.Array, residual: jax.Array, *, eps: float, impl: str = "xla") -> jax.Array:
  if check_impl(impl) == "pallas":
    return rms_norm_lib.residual_rms_norm(x, residual, eps=eps)
  return rms_norm_lib.residual_rms_norm_reference(x, residual, eps=eps)


def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, impl: str = "xla") -> jax.Array:
  if check_impl(impl) == "pallas":
    return swiglu_lib.swiglu(x, w_gate_up, w_down)
  return swiglu_lib.swiglu_reference(x, w_gate_up, w_down)
