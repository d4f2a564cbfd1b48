"""The Pallas ops' launch parameters as config data: config.model.kernel_params -> ops.KernelParams."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax.configs import default as default_config
from trm_jax.kernels import attention as attention_lib
from trm_jax.kernels import rms_norm as rms_norm_lib
from trm_jax.kernels import swiglu as swiglu_lib
from trm_jax import act
from trm_jax import bench
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import losses
from trm_jax import ops
from trm_jax import train
from trm_jax.models import trm


def test_the_config_block_is_every_field_with_its_default():
  block = default_config.get_config().model.kernel_params.to_dict()
  expected = ops.KernelParams()
  assert set(block) == {f.name for f in dataclasses.fields(expected)}
  for op, sizes in block.items():
    assert sizes == getattr(expected, op).to_dict(), op  # same keys, same defaults
  assert ops.KernelParams.from_dict(block) == expected


def _model_for(**kernel_params):
  config = default_config.get_config()
  for op, sizes in kernel_params.items():
    for key, value in sizes.items():
      setattr(getattr(config.model.kernel_params, op), key, value)
  return bench.model_for(config, seq_len=8, vocab_size=6, num_puzzle_identifiers=3)


@pytest.mark.parametrize("op, key, value, expected", [
    ("attention", "block_q", 48, "a power of two >= 16"),
    ("attention", "num_warps", 3, "a power of two >= 1"),
    ("attention", "num_stages_bwd", 0, "a positive integer"),
    ("rms_norm_mlp_t", "block_rows", 6, r"a power of two >= 1 or 0 \(automatic\)"),
    ("swiglu", "matmul_impl", "cublas", r"one of \('xla', 'pallas'\)"),
    ("swiglu_mlp_t", "block_width", 8, "a power of two >= 16"),
])
def test_a_bad_value_is_one_line_naming_the_config_key(op, key, value, expected):
  with pytest.raises(train.UserError) as info:
    _model_for(**{op: {key: value}})
  assert str(info.value) == f"config.model.kernel_params.{op}.{key}={value!r}: expected " + expected.replace("\\", "")


def test_the_model_config_takes_a_mapping_and_names_what_it_rejects():
  fields = dict(seq_len=8, vocab_size=6, num_puzzle_identifiers=3)
  config = trm.TRMConfig(**fields, kernel_params={"swiglu_mlp_t": {"matmul_impl": "pallas"}})
  assert config.kernel_params == ops.KernelParams(swiglu_mlp_t=swiglu_lib.SwiGLUBlockSizes(matmul_impl="pallas"))
  assert hash(config) == hash(dataclasses.replace(config))  # static in jit, as before
  assert trm.TRMConfig.from_dict(config.to_dict()) == config  # exported configs round-trip
  for bad, message in [({"attn": {}}, r"^model config: kernel_params: unknown op\(s\) \['attn'\]"),
                       ({"attention": {"blockq": 16}}, r"^model config: kernel_params\.attention: unknown key"),
                       ({"attention": 16}, r"^model config: kernel_params\.attention: expected a mapping"),
                       (16, r"^model config: kernel_params=16: expected a mapping")]:
    with pytest.raises(ValueError, match=message):
      trm.TRMConfig(**fields, kernel_params=bad)


# Non-default tiles at every op: several blocks where the defaults use one (32 positions, 64 rows,
# D = 32, I = 256), the Pallas matmul, and each op its own BlockSizes.
CUSTOM = {
    "attention": dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, num_warps=8, num_stages=2),
    "rms_norm": dict(block_rows=4, num_warps=2),
    "rms_norm_mlp_t": dict(block_rows=8),
    "swiglu": dict(block_rows=16, block_inter=32, block_width=16, matmul_impl="pallas", matmul_block_m=16,
                   matmul_block_n=32, matmul_block_k=16),
    "swiglu_mlp_t": dict(block_rows=32, block_inter=128, block_width=16, matmul_impl="pallas"),
}


@pytest.mark.parametrize("mlp_t", [False, True])
def test_non_default_tiles_from_the_config_give_the_default_numbers(monkeypatch, mlp_t):
  """Pallas interpret mode: the config's tiles reach each op and change no number.

  (Forward only, to keep it quick: tests/kernels checks each kernel's
  gradients with non-default tiles against its reference.)
  """
  seen = []

  def spy(module, name):
    real = getattr(module, name)

    def wrapped(*args, block_sizes, **kwargs):
      seen.append(block_sizes)
      return real(*args, block_sizes=block_sizes, **kwargs)
    monkeypatch.setattr(module, name, wrapped)
  spy(attention_lib, "attention")
  spy(rms_norm_lib, "residual_rms_norm")
  spy(swiglu_lib, "swiglu")

  fields = dict(seq_len=30, vocab_size=6, num_puzzle_identifiers=3, hidden_size=32, num_heads=2, expansion=2.0,
                L_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_ndim=32, puzzle_emb_len=2, halt_max_steps=2,
                forward_dtype="float32", mlp_t=mlp_t, kernels="pallas")
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, 6, (2, 30)), jnp.int32),
           "labels": jnp.asarray(rng.integers(0, 6, (2, 30)), jnp.int32),
           "puzzle_identifiers": jnp.asarray([0, 2], jnp.int32)}

  def loss_and_logits(config):
    params = trm.init_params(config, jax.random.key(0))
    table = jax.random.normal(jax.random.key(1), (3, 32))
    carry = act.initial_carry(config, batch)
    _, loss, _, outputs = jax.jit(lambda p: losses.act_call(config, p, table, carry, batch, train=False))(params)
    return loss, outputs["logits"]

  loss, logits = loss_and_logits(trm.TRMConfig(**fields))
  used = ("rms_norm", "swiglu") + (("rms_norm_mlp_t", "swiglu_mlp_t") if mlp_t else ("attention",))
  assert set(seen) == {getattr(ops.DEFAULT_PARAMS, op) for op in used}
  seen.clear()
  custom = trm.TRMConfig(**fields, kernel_params=CUSTOM)
  custom_loss, custom_logits = loss_and_logits(custom)
  assert set(seen) == {getattr(custom.kernel_params, op) for op in used}
  assert all(getattr(custom.kernel_params, op) != getattr(ops.DEFAULT_PARAMS, op) for op in used)
  # Equal up to float32 summation order (other tiles, other partial sums).
  np.testing.assert_allclose(custom_logits, logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(custom_loss, loss, rtol=1e-5)


def test_a_resume_may_change_kernel_params_but_not_the_model():
  """They are how, not what, the model computes (checkpoint.IMPLEMENTATION_PREFIXES)."""
  saved = {"config": checkpoint_lib.config_to_dict(default_config.get_config()), "dataset": {}}
  current = default_config.get_config()
  current.model.kernels = "pallas"
  current.model.kernel_params.attention.block_q = 128
  current.model.kernel_params.swiglu_mlp_t.matmul_impl = "pallas"
  for config in (saved["config"], checkpoint_lib.config_to_dict(current)):
    checkpoint_lib.check_compatible(saved["config"], config, "checkpoint")
  checkpoint_lib.check_resume(saved, checkpoint_lib.config_to_dict(current), {}, "checkpoint")
  # A checkpoint written before kernel_params existed resumes too.
  old = checkpoint_lib.config_to_dict(default_config.get_config())
  del old["model"]["kernel_params"]
  checkpoint_lib.check_resume({"config": old, "dataset": {}}, checkpoint_lib.config_to_dict(current), {},
                              "checkpoint")
  current.model.H_cycles = 2  # what the model computes: refused, as before
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="model.H_cycles"):
    checkpoint_lib.check_resume(saved, checkpoint_lib.config_to_dict(current), {}, "checkpoint")
