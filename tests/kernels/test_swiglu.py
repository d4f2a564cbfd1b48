"""kernels.swiglu against swiglu_reference, in Pallas interpret mode."""

import math

import jax
import jax.numpy as jnp
import pytest

from trm_jax.kernels import swiglu as swiglu_lib


def inter_width(width: int, expansion: float = 4.0) -> int:
  """SPEC §1: ceil_to_multiple(round(expansion * width * 2 / 3), 256)."""
  return -(-round(expansion * width * 2 / 3) // 256) * 256


# (leading dims of x, D, dtype, SwiGLUBlockSizes fields). Channel MLPs have D = 64 or
# 512; the mlp_t variant runs over positions: D = S + P in {32, 97, 916}.
CASES = {
    "d64_f32": ((3, 10), 64, jnp.float32, {}),
    "d64_f32_small_tiles_pallas_matmul": (
        (2, 9), 64, jnp.float32,
        dict(block_rows=16, block_inter=32, block_width=16, matmul_impl="pallas",
             matmul_block_m=16, matmul_block_n=32, matmul_block_k=16)),
    "d512_bf16": ((2, 9), 512, jnp.bfloat16, {}),
    "mlp_t_d32_f32": ((5,), 32, jnp.float32, {}),
    "mlp_t_d97_bf16_pallas_matmul": ((2, 12), 97, jnp.bfloat16, dict(matmul_impl="pallas")),
    "mlp_t_d916_f32": ((1, 3), 916, jnp.float32, {}),
}
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_forward_and_grads(case, assert_close, value_and_grads):
  leading, width, dtype, kwargs = CASES[case]
  inter = inter_width(width)
  keys = jax.random.split(jax.random.key(sum(map(ord, case))), 4)
  x = jax.random.normal(keys[0], (*leading, width)).astype(dtype)
  w_gate_up = jax.random.normal(keys[1], (width, 2 * inter)) / math.sqrt(width)
  w_down = jax.random.normal(keys[2], (inter, width)) / math.sqrt(inter)
  args = [x, w_gate_up, w_down]

  block_sizes = swiglu_lib.SwiGLUBlockSizes(**kwargs)
  out, grads = value_and_grads(lambda *a: swiglu_lib.swiglu(*a, block_sizes=block_sizes), args, (0, 1, 2),
                               keys[3])
  ref_out, ref_grads = value_and_grads(swiglu_lib.swiglu_reference, args, (0, 1, 2), keys[3])
  tol = TOLERANCE[dtype]
  assert_close(out, ref_out, tol, "output")
  for name, grad, ref_grad in zip(["dx", "dw_gate_up", "dw_down"], grads, ref_grads):
    assert_close(grad, ref_grad, tol, name)
  assert grads[1].dtype == grads[2].dtype == jnp.float32


def test_non_multiple_of_256_inter_width(assert_close, value_and_grads):
  """I is padded to whole tiles too (the model's rule gives multiples of 256)."""
  keys = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(keys[0], (7, 48))
  w_gate_up = jax.random.normal(keys[1], (48, 2 * 40)) / math.sqrt(48)
  w_down = jax.random.normal(keys[2], (40, 48)) / math.sqrt(40)
  args = [x, w_gate_up, w_down]
  out, grads = value_and_grads(
      lambda *a: swiglu_lib.swiglu(
          *a, block_sizes=swiglu_lib.SwiGLUBlockSizes(block_inter=32, matmul_impl="pallas")), args,
      (0, 1, 2), keys[3])
  ref_out, ref_grads = value_and_grads(swiglu_lib.swiglu_reference, args, (0, 1, 2), keys[3])
  assert_close(out, ref_out, 2e-5, "output")
  for name, grad, ref_grad in zip(["dx", "dw_gate_up", "dw_down"], grads, ref_grads):
    assert_close(grad, ref_grad, 2e-5, name)


@pytest.mark.parametrize("shapes, kwargs, message", [
    (((4, 64), (64, 512), (256, 32)), {}, "expected w_gate_up"),
    (((4, 64), (64, 500), (256, 64)), {}, "expected w_gate_up"),
    (((4, 64), (64, 512), (256,)), {}, "w_down must be 2-D"),
    (((4, 0), (0, 512), (256, 0)), {}, "non-empty"),
    (((4, 64), (64, 512), (256, 64)), dict(block_inter=96), r"block_inter=96: expected a power of two >= 16$"),
    (((4, 64), (64, 512), (256, 64)), dict(matmul_impl="cublas"),
     r"matmul_impl='cublas': expected one of \('xla', 'pallas'\)$"),
    (((4, 64), (64, 512), (256, 64)), dict(matmul_block_k=8), r"matmul_block_k=8: expected a power of two >= 16$"),
    (((4, 64), (64, 512), (256, 64)), dict(matmul_num_stages=0), "matmul_num_stages=0: expected a positive"),
])
def test_invalid_inputs_raise(shapes, kwargs, message):
  x, w_gate_up, w_down = (jnp.ones(shape) for shape in shapes)
  with pytest.raises(ValueError, match=message):
    swiglu_lib.swiglu(x, w_gate_up, w_down, block_sizes=swiglu_lib.SwiGLUBlockSizes(**kwargs))


def test_integer_input_raises():
  with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
    swiglu_lib.swiglu(jnp.ones((4, 64), jnp.int32), jnp.ones((64, 512)), jnp.ones((256, 64)))
