"""kernels.attention against attention_reference, in Pallas interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.kernels import attention as attention_lib


def rope_tables(seq_len: int, head_dim: int):
  """The model's RoPE tables (theta 10000, half-split layout)."""
  inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
  angles = np.arange(seq_len)[:, None] * inv_freq[None, :]
  emb = np.concatenate([angles, angles], axis=-1)
  return jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)


def random_tables(key, seq_len: int, head_dim: int):
  """Arbitrary cos/sin (lower and upper halves differ), to test the general math."""
  cos_key, sin_key = jax.random.split(key)
  return (jax.random.normal(cos_key, (seq_len, head_dim), jnp.float32),
          jax.random.normal(sin_key, (seq_len, head_dim), jnp.float32))


# (batch, seq, heads, head_dim, rope, dtype, sm_scale and AttentionBlockSizes fields). 97 = 81 + 16
# (sudoku) and 916 = 900 + 16 (ARC, maze) are not multiples of any block.
CASES = {
    "s97_k64_rope_f32": (2, 97, 2, 64, "model", jnp.float32, {}),
    "s97_k32_bf16": (2, 97, 2, 32, None, jnp.bfloat16, {}),
    "s97_k8_rope_bf16": (1, 97, 3, 8, "model", jnp.bfloat16, {}),
    "s97_k16_random_rope_f32_small_blocks": (
        1, 97, 2, 16, "random", jnp.float32,
        dict(block_q=16, block_k=32, block_q_bwd=32, block_k_bwd=16, sm_scale=0.3)),
    "s64_k32_rope_f32_whole_blocks": (2, 64, 2, 32, "model", jnp.float32,
                                      dict(block_q=32, block_k=16)),
    "s916_k64_rope_bf16": (1, 916, 1, 64, "model", jnp.bfloat16, {}),
    "s916_k16_f32": (1, 916, 2, 16, None, jnp.float32, {}),
}
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_forward_and_grads(case, assert_close, value_and_grads):
  batch, seq_len, heads, head_dim, rope, dtype, kwargs = CASES[case]
  keys = jax.random.split(jax.random.key(sum(map(ord, case))), 5)
  shape = (batch, seq_len, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:3])
  args = [q, k, v]
  if rope == "model":
    args += rope_tables(seq_len, head_dim)
  elif rope == "random":
    args += random_tables(keys[3], seq_len, head_dim)
  sm_scale = kwargs.pop("sm_scale", None)
  argnums = tuple(range(len(args)))

  def kernel(*a):
    return attention_lib.attention(*a, sm_scale=sm_scale,
                                   block_sizes=attention_lib.AttentionBlockSizes(**kwargs))

  def reference(*a):
    return attention_lib.attention_reference(*a, sm_scale=sm_scale)

  out, grads = value_and_grads(kernel, args, argnums, keys[4])
  ref_out, ref_grads = value_and_grads(reference, args, argnums, keys[4])
  tol = TOLERANCE[dtype]
  assert_close(out, ref_out, tol, "output")
  for name, grad, ref_grad in zip(["dq", "dk", "dv", "dcos", "dsin"], grads, ref_grads):
    assert_close(grad, ref_grad, tol, name)


def _qkv(shape=(1, 8, 2, 16), dtype=jnp.float32):
  return [jnp.ones(shape, dtype)] * 3


@pytest.mark.parametrize("make_args, kwargs, message", [
    (lambda: [jnp.ones((1, 8, 2, 16)), jnp.ones((1, 9, 2, 16)), jnp.ones((1, 8, 2, 16))], {},
     "same shape"),
    (lambda: _qkv((8, 2, 16)), {}, r"\[B, S, H, K\]"),
    (lambda: _qkv((1, 8, 2, 128)), {}, "head dim"),
    (lambda: [jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8, 2, 16), jnp.bfloat16),
              jnp.ones((1, 8, 2, 16))], {}, "same dtype"),
    (lambda: _qkv(dtype=jnp.int32), {}, "float32, bfloat16 or float16"),
    (lambda: _qkv() + [jnp.ones((8, 16)), None], {}, "both cos and sin"),
    (lambda: _qkv() + [jnp.ones((8, 8)), jnp.ones((8, 8))], {}, r"shape \(S, K\)"),
    (lambda: _qkv((1, 8, 2, 15)) + [jnp.ones((8, 15)), jnp.ones((8, 15))], {}, "even head dim"),
    (lambda: _qkv(), dict(block_q=48), r"AttentionBlockSizes\.block_q=48: expected a power of two >= 16$"),
    (lambda: _qkv(), dict(block_k_bwd=8), r"block_k_bwd=8: expected a power of two >= 16$"),
    (lambda: _qkv(), dict(num_warps=3), r"num_warps=3: expected a power of two >= 1$"),
    (lambda: _qkv(), dict(num_stages_bwd=0), r"num_stages_bwd=0: expected a positive integer$"),
    (lambda: _qkv(), dict(block_k=64.0), r"block_k=64\.0: expected a power of two"),
])
def test_invalid_inputs_raise(make_args, kwargs, message):
  with pytest.raises(ValueError, match=message):
    attention_lib.attention(*make_args(), block_sizes=attention_lib.AttentionBlockSizes(**kwargs))


def test_block_sizes_must_be_attention_block_sizes():
  from trm_jax.kernels import rms_norm as rms_norm_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="block_sizes must be an AttentionBlockSizes"):
    attention_lib.attention(*_qkv(), block_sizes=rms_norm_lib.RMSNormBlockSizes())
