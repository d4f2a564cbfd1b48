"""SwiGLU MLP without biases (SPEC §1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu_reference(x: jax.Array, w_gate_up_Dx2I: jax.Array, w_down_IxD: jax.Array) -> jax.Array:
  """(silu(g) * u) @ w_down with [g, u] = split(x @ w_gate_up, 2) over the last axis.

  Weights are stored ``[in, out]`` in float32 and cast to ``x.dtype`` at use.
  """
  dtype = x.dtype
  gate_up = jnp.dot(x, w_gate_up_Dx2I.astype(dtype))
  gate, up = jnp.split(gate_up, 2, axis=-1)
  return jnp.dot(jax.nn.silu(gate) * up, w_down_IxD.astype(dtype))
