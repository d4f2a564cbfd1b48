"""Float32 fidelity in long recursions, and the float64 reference mode.

``tests/data/golden_long_attn_rope.npz`` holds numbers from the original
PyTorch code (commit e7b6871, torch 2.14.1 on a CPU) for a case longer than
the shared golden files: hidden size 128, 4 heads, RoPE, 81 tokens plus a
16-position puzzle-embedding prefix, H_cycles 3, L_cycles 6, 2 layers,
expansion 4, batch 3, stablemax loss, five eval-mode ACT calls on the same
batch from the all-halted initial carry. Its weights were drawn as the shared
files' are: every weight normal with std 1/sqrt(fan in), the block weights
times ``block_scale`` (0.9 here), the Q head at 0.3/sqrt(D) with a random
bias, H_init and L_init standard normal, the puzzle table at std 0.5. The file
keeps the weights, the batch, the carry and logits after the last call in
float32, and the carry after the last call of a float64 run of the same code
(forward_dtype "float64", with its RMSNorm and RoPE tables patched at run time
to float64 too), stored rounded to float32. ``swiglu/*`` is the input of the
first block's MLP (the float64 run's z_L after the first call, rounded to
float32) and the original's relative RMS error of that MLP in float32 against
float64 on it (torch's CPU sgemm).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shared_paths
from trm_jax.configs import quickstart
from trm_jax import act
from trm_jax import errors
from trm_jax import losses
from trm_jax import runs
from trm_jax import weights
from trm_jax.models import layers
from trm_jax.models import trm

LONG_CASE = shared_paths.REPO_ROOT / "tests" / "data" / "golden_long_attn_rope.npz"
LAST = 4  # the index of the last eval call in the file


def relative_error(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def load(path, forward_dtype):
  data = np.load(path)
  fields = json.loads(str(data["config_json"]))
  config = trm.TRMConfig.from_dict({**fields, "forward_dtype": forward_dtype})
  config = dataclasses.replace(config, halt_exploration_prob=0.0)
  state = {k[len("param/"):]: data[k] for k in data.files if k.startswith("param/")}
  params, table = weights.import_state_dict(config, state)
  batch = {k: jnp.asarray(data[f"batch/{k}"], jnp.int32) for k in ("inputs", "labels", "puzzle_identifiers")}
  return data, config, params, table, batch


def eval_trajectory(config, params, table, batch):
  """The carry and outputs after each eval-mode call on the same batch."""
  call = jax.jit(lambda p, t, c, x: losses.act_call(config, p, t, c, x, train=False))
  carry = act.initial_carry(config, batch)
  out = []
  with jax.default_matmul_precision("highest"):
    for _ in range(config.halt_max_steps):
      carry, _, _, outputs = call(params, table, carry, batch)
      out.append((carry, outputs))
  return out


def test_long_case_float32_within_tolerance_of_original():
  data, config, params, table, batch = load(LONG_CASE, "float32")
  carry, outputs = eval_trajectory(config, params, table, batch)[LAST]
  g = f"eval/{LAST}/"
  for name, ours in (("z_H", carry.latents["z_H"]), ("z_L", carry.latents["z_L"]), ("logits", outputs["logits"])):
    assert relative_error(ours, data[g + name]) < 1e-4, name
  np.testing.assert_array_equal(carry.halted, data[g + "halted"])
  np.testing.assert_array_equal(carry.steps, data[g + "steps"])


def swiglu_error(params, x_f32):
  """Relative RMS error of the first block's MLP in float32 against float64."""
  mlp = layers.SwiGLU(128, 4.0)
  w = {"params": params["L_level"]["layers_0"]["mlp"]}
  with jax.enable_x64(True), jax.default_matmul_precision("highest"):
    out32 = np.asarray(jax.jit(lambda x: mlp.apply(w, x))(jnp.asarray(x_f32)), np.float64)
    out64 = np.asarray(jax.jit(lambda x: mlp.apply(w, x))(jnp.asarray(x_f32, jnp.float64)))
  return float(np.sqrt(np.mean((out32 - out64) ** 2) / np.mean(out64 ** 2)))


def test_swiglu_float32_loses_no_more_than_the_original():
  """The op that made long float32 recursions drift: the MLP's down projection.

  Summed over its 512 inputs in one float32 running sum (XLA:CPU's dot), the
  MLP lost 1.3x the original's precision (5.3e-7 against 4.1e-7 here);
  summed in blocks (``kernels.swiglu.down_projection``) it loses no more.
  """
  data, _, params, _, _ = load(LONG_CASE, "float32")
  ours = swiglu_error(params, data["swiglu/input"])
  original = float(data["swiglu/original_float32_error"])
  assert ours <= 1.1 * original, (ours, original)


def test_long_case_float64_matches_original_float64():
  """Far tighter than any float32 run: the original's own float32 carry is 2.5e-5 from it."""
  with jax.enable_x64(True):
    data, config, params, table, batch = load(LONG_CASE, "float64")
    carry, _ = eval_trajectory(config, params, table, batch)[LAST]
    assert carry.latents["z_H"].dtype == jnp.float64
    for name, ours in (("z_H", carry.latents["z_H"]), ("z_L", carry.latents["z_L"])):
      ref = data[f"eval_float64/{LAST}/{name}"]
      # The file stores the float64 run rounded to float32 (6e-8 relative).
      assert relative_error(ours, ref) < 1e-6, name
      assert relative_error(data[f"eval/{LAST}/{name}"], ref) > 1e-5, name


def test_float64_needs_x64():
  with jax.enable_x64(False):
    with pytest.raises(ValueError, match=r"forward_dtype='float64' needs 64-bit JAX: set .*JAX_ENABLE_X64=1"):
      trm.TRMConfig(seq_len=4, vocab_size=3, num_puzzle_identifiers=1, forward_dtype="float64")


def test_float64_error_through_the_trainer_names_the_key():
  config = quickstart.get_config()
  config.model.forward_dtype = "float64"
  metadata = type("Metadata", (), dict(seq_len=81, vocab_size=11, num_puzzle_identifiers=1))()
  with jax.enable_x64(False):
    with pytest.raises(errors.UserError, match=r"^config\.model\.forward_dtype='float64' needs 64-bit JAX"):
      runs.model_config(config, metadata)


def test_float64_is_an_xla_mode():
  with jax.enable_x64(True):
    with pytest.raises(ValueError, match="kernels='xla' only"):
      trm.TRMConfig(seq_len=4, vocab_size=3, num_puzzle_identifiers=1, forward_dtype="float64",
                    kernels="pallas")
