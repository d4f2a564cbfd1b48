"""The one place that picks an implementation for each hot-path op.

``impl`` is the config string ``model.kernels``: ``"xla"`` (plain jnp, the
default) or ``"pallas"`` (the fused kernels of ``kernels/``). An unknown
value raises.

``params`` is ``model.kernel_params``, a ``KernelParams``: the launch
parameters (tile sizes, Triton's warps and stages) of each Pallas op, one
``BlockSizes`` dataclass per use. The ops over positions (mlp_t's, width
S + P) have their own, since their best tiles differ from the channel ops'
(width D). With ``"xla"`` they are unused. They change how an op runs, never
what it computes, so a run may resume with other values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from trm_jax.kernels import attention as attention_lib
from trm_jax.kernels import rms_norm as rms_norm_lib
from trm_jax.kernels import swiglu as swiglu_lib

IMPLEMENTATIONS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class KernelParams:
  """Every Pallas op's launch parameters; the defaults are each op's (``config.model.kernel_params``).

  The field names are the cases of ``trm_jax.bench_kernels``, whose sweep
  prints its best parameters as overrides of these keys.
  """
  attention: attention_lib.AttentionBlockSizes = attention_lib.AttentionBlockSizes()
  rms_norm: rms_norm_lib.RMSNormBlockSizes = rms_norm_lib.RMSNormBlockSizes()
  rms_norm_mlp_t: rms_norm_lib.RMSNormBlockSizes = rms_norm_lib.RMSNormBlockSizes()
  swiglu: swiglu_lib.SwiGLUBlockSizes = swiglu_lib.SwiGLUBlockSizes()
  swiglu_mlp_t: swiglu_lib.SwiGLUBlockSizes = swiglu_lib.SwiGLUBlockSizes()

  def __post_init__(self):
    for field in dataclasses.fields(self):
      expected = type(field.default)
      if not isinstance(getattr(self, field.name), expected):
        raise ValueError(f"kernel_params.{field.name}: expected a {expected.__name__}, "
                         f"got {getattr(self, field.name)!r}")

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], where: str = "kernel_params") -> "KernelParams":
    """From ``{op: {key: value}}`` (missing ops and keys keep their defaults); an unknown op
    or key, or a bad value, raises naming ``<where>.<op>.<key>``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
      raise ValueError(f"{where}: unknown op(s) {unknown}; expected some of {names}")
    bad = [op for op, sizes in values.items() if not isinstance(sizes, Mapping)]
    if bad:
      raise ValueError(f"{where}.{bad[0]}: expected a mapping of launch parameters, got {values[bad[0]]!r}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return cls(**{op: type(defaults[op]).from_dict(dict(sizes), f"{where}.{op}") for op, sizes in values.items()})

  def overrides(self, prefix: str = "--config.model.kernel_params") -> list[str]:
    """The flags that turn the default parameters into these ones (non-default values only)."""
    default = KernelParams()
    return [f"{prefix}.{op}.{key}={value}"
            for op in (f.name for f in dataclasses.fields(self))
            for key, value in getattr(self, op).to_dict().items()
            if getattr(getattr(default, op), key) != value]


DEFAULT_PARAMS = KernelParams()


def check_impl(impl: str) -> str:
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"model.kernels must be one of {IMPLEMENTATIONS}, got {impl!r}")
  return impl


def attention(q_BxSxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
              cos_SxK: jax.Array | None = None, sin_SxK: jax.Array | None = None,
              *, impl: str = "xla", params: KernelParams = DEFAULT_PARAMS) -> jax.Array:
  if check_impl(impl) == "pallas":
    return attention_lib.attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, cos_SxK, sin_SxK,
                                   block_sizes=params.attention)
  return attention_lib.attention_reference(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, cos_SxK, sin_SxK)


def residual_rms_norm(x: jax.Array, residual: jax.Array, *, eps: float, impl: str = "xla",
                      params: KernelParams = DEFAULT_PARAMS) -> jax.Array:
  if check_impl(impl) == "pallas":
    return rms_norm_lib.residual_rms_norm(x, residual, eps=eps, block_sizes=params.rms_norm)
  return rms_norm_lib.residual_rms_norm_reference(x, residual, eps=eps)


def swiglu(x: jax.Array, w_gate_up: jax.Array, w_down: jax.Array, *, impl: str = "xla",
           params: KernelParams = DEFAULT_PARAMS) -> jax.Array:
  if check_impl(impl) == "pallas":
    return swiglu_lib.swiglu(x, w_gate_up, w_down, block_sizes=params.swiglu)
  # As one [N, D] matrix: a contraction over a single row axis in the backward
  # (the weight gradients), which XLA:CPU does without transposing the activations.
  return swiglu_lib.swiglu_reference(x.reshape(-1, x.shape[-1]), w_gate_up, w_down).reshape(x.shape[:-1] + (-1,))


def residual_rms_norm_axis0(x: jax.Array, residual: jax.Array, *, eps: float, impl: str = "xla",
                            params: KernelParams = DEFAULT_PARAMS) -> jax.Array:
  """``residual_rms_norm`` over the FIRST axis (mlp_t's positions in a ``[S, B, D]`` layout).

  With ``"xla"`` it reduces over axis 0 in place (XLA fuses the add, the
  reduction and the scale; nothing is transposed); ``"pallas"`` (a last-axis
  kernel, with ``params.rms_norm_mlp_t``) moves the axis last and back.
  """
  if check_impl(impl) == "pallas":
    return jnp.moveaxis(rms_norm_lib.residual_rms_norm(jnp.moveaxis(x, 0, -1), jnp.moveaxis(residual, 0, -1),
                                                       eps=eps, block_sizes=params.rms_norm_mlp_t), -1, 0)
  h = (x + residual).astype(jnp.float32)
  variance = jnp.mean(jnp.square(h), axis=0, keepdims=True)
  return (h * jax.lax.rsqrt(variance + eps)).astype(x.dtype)


def swiglu_axis0(x_WxN: jax.Array, w_gate_up_Wx2I: jax.Array, w_down_IxW: jax.Array, *,
                 impl: str = "xla", params: KernelParams = DEFAULT_PARAMS) -> jax.Array:
  """``swiglu`` over the FIRST axis of ``x [W, N]``: ``swiglu(x.T, ...).T``, same numbers.

  mlp_t mixes positions: with the activations laid out ``[S, B*D]`` this is
  two plain matrix products whose weights are read transposed (``W.T @ x``,
  a BLAS transpose flag, not a copy), and so are their gradients; the
  ``[B, D, S]`` layout needed transposes of every activation around each
  product, forward and backward. ``"pallas"`` (a last-axis kernel, with
  ``params.swiglu_mlp_t``) transposes.
  """
  if check_impl(impl) == "pallas":
    return swiglu_lib.swiglu(x_WxN.T, w_gate_up_Wx2I, w_down_IxW, block_sizes=params.swiglu_mlp_t).T
  dtype = x_WxN.dtype
  contract_rows = (((0,), (0,)), ((), ()))
  gate_up_2IxN = jax.lax.dot_general(w_gate_up_Wx2I.astype(dtype), x_WxN, contract_rows)
  gate_IxN, up_IxN = jnp.split(gate_up_2IxN, 2, axis=0)
  return jax.lax.dot_general(w_down_IxW.astype(dtype), jax.nn.silu(gate_IxN) * up_IxN, contract_rows)
