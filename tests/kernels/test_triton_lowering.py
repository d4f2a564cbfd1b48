"""The kernels lower to Triton IR for an H100, checked on this CPU-only host.

Interpret mode runs the kernels' math but not the Triton lowering's rules
(power-of-two tiles, the primitives it supports, dot operand shapes). Lowering
the jitted forward + backward for the ``cuda`` platform runs those rules
without a GPU. Pallas asks the local GPU for its compute capability while
lowering; the ``h100`` fixture answers for it (a private jax API, stable
across the jax range setup.cfg allows).
"""

import warnings

import jax
from jax import export
import jax.numpy as jnp
import pytest

from trm_jax.kernels import attention as attention_lib
from trm_jax.kernels import rms_norm as rms_norm_lib
from trm_jax.kernels import swiglu as swiglu_lib

TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def h100(monkeypatch):
  from jax._src.pallas.triton import gpu_info  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.triton import pallas_call_registration  # pylint: disable=g-import-not-at-top
  info = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: info)


def lower_for_cuda(fn, *shapes) -> str:
  """StableHLO text of jit(value_and_grad(sum(fn))) lowered for CUDA."""

  def loss(*args):
    return jnp.sum(fn(*args).astype(jnp.float32))

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(shapes)))))
  with warnings.catch_warnings():
    # jax >= 0.11 flags the Pallas Triton backend as deprecated at lowering.
    warnings.simplefilter("ignore", DeprecationWarning)
    exported = export.export(
        grad_fn, platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
  return exported.mlir_module()


def kernel_names(module_text: str) -> list[str]:
  names = []
  for line in module_text.splitlines():
    if f"custom_call @{TRITON_CALL}" in line:
      names.append(line.split('name = "')[1].split('"')[0])
  return sorted(names)


DTYPES = [jnp.bfloat16, jnp.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_len, head_dim, rope", [(916, 64, True), (97, 64, False),
                                                     (97, 8, True)])
def test_attention_lowers(h100, dtype, seq_len, head_dim, rope):
  qkv = [jax.ShapeDtypeStruct((2, seq_len, 8, head_dim), dtype)] * 3
  tables = [jax.ShapeDtypeStruct((seq_len, head_dim), jnp.float32)] * 2 if rope else []
  text = lower_for_cuda(lambda *a: attention_lib.attention(*a, interpret=False), *qkv, *tables)
  assert kernel_names(text) == ["trm_attention_bwd_dkdv", "trm_attention_bwd_dq",
                                "trm_attention_fwd"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 916, 512), (2, 512, 97), (2, 512, 916)])
def test_rms_norm_lowers(h100, dtype, shape):
  x = jax.ShapeDtypeStruct(shape, dtype)
  text = lower_for_cuda(
      lambda a, b: rms_norm_lib.residual_rms_norm(a, b, eps=1e-5, interpret=False), x, x)
  assert kernel_names(text) == ["trm_residual_rms_norm_bwd", "trm_residual_rms_norm_fwd"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("matmul_impl, num_matmul_kernels", [("xla", 0), ("pallas", 4)])
@pytest.mark.parametrize("shape, inter", [((2, 916, 512), 1536), ((2, 512, 97), 512),
                                          ((2, 512, 916), 2560), ((4, 97, 64), 256)])
def test_swiglu_lowers(h100, dtype, matmul_impl, num_matmul_kernels, shape, inter):
  width = shape[-1]
  text = lower_for_cuda(
      lambda *a: swiglu_lib.swiglu(*a, block_sizes=swiglu_lib.SwiGLUBlockSizes(matmul_impl=matmul_impl),
                                   interpret=False),
      jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((width, 2 * inter), jnp.float32),
      jax.ShapeDtypeStruct((inter, width), jnp.float32))
  assert kernel_names(text) == ["trm_swiglu_gate_up", "trm_swiglu_gate_up_bwd"] + [
      "trm_swiglu_matmul"] * num_matmul_kernels
