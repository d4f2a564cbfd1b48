"""kernels.rms_norm against residual_rms_norm_reference, in Pallas interpret mode."""

import jax
import jax.numpy as jnp
import pytest

from trm_jax.kernels import rms_norm as rms_norm_lib

# (shape, dtype, eps, RMSNormBlockSizes fields). The last axis is the normalised one:
# 97 and 916 are the mlp_t position axes (sudoku, ARC), 512 / 64 channel widths.
CASES = {
    "w97_f32": ((3, 97), jnp.float32, 1e-5, {}),
    "w916_bf16": ((2, 5, 916), jnp.bfloat16, 1e-5, {}),
    "w512_f32_two_row_blocks": ((4, 7, 512), jnp.float32, 1e-5, dict(block_rows=2)),
    "w64_bf16": ((2, 3, 64), jnp.bfloat16, 1e-5, {}),
    "w32_f16_eps": ((6, 32), jnp.float16, 1e-2, dict(num_warps=2)),
}
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_forward_and_grads(case, assert_close, value_and_grads):
  shape, dtype, eps, kwargs = CASES[case]
  keys = jax.random.split(jax.random.key(sum(map(ord, case))), 3)
  # Different scales for x and residual so that eps and the add both matter.
  x = (2.0 * jax.random.normal(keys[0], shape)).astype(dtype)
  residual = (0.5 * jax.random.normal(keys[1], shape)).astype(dtype)

  out, grads = value_and_grads(
      lambda a, b: rms_norm_lib.residual_rms_norm(
          a, b, eps=eps, block_sizes=rms_norm_lib.RMSNormBlockSizes(**kwargs)), [x, residual],
      (0, 1), keys[2])
  ref_out, ref_grads = value_and_grads(
      lambda a, b: rms_norm_lib.residual_rms_norm_reference(a, b, eps=eps), [x, residual],
      (0, 1), keys[2])
  tol = TOLERANCE[dtype]
  assert_close(out, ref_out, tol, "output")
  assert_close(grads[0], ref_grads[0], tol, "dx")
  assert_close(grads[1], ref_grads[1], tol, "dresidual")


@pytest.mark.parametrize("x, residual, kwargs, message", [
    (jnp.ones((2, 8)), jnp.ones((2, 9)), {}, "same shape"),
    (jnp.ones((2, 8)), jnp.ones((2, 8), jnp.bfloat16), {}, "same dtype"),
    (jnp.ones((2, 8), jnp.int32), jnp.ones((2, 8), jnp.int32), {}, "float32, bfloat16"),
    (jnp.ones(()), jnp.ones(()), {}, "last axis"),
    (jnp.ones((2, 8)), jnp.ones((2, 8)), dict(block_rows=3),
     r"block_rows=3: expected a power of two >= 1 or 0 \(automatic\)$"),
    (jnp.ones((2, 8)), jnp.ones((2, 8)), dict(num_warps=0), "num_warps=0: expected a power of two"),
])
def test_invalid_inputs_raise(x, residual, kwargs, message):
  with pytest.raises(ValueError, match=message):
    rms_norm_lib.residual_rms_norm(x, residual, eps=1e-5, block_sizes=rms_norm_lib.RMSNormBlockSizes(**kwargs))
