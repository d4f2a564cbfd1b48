"""Model construction, configuration errors, weights, dtypes and compilation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import compiles
from trm_jax import act
from trm_jax import losses
from trm_jax import weights
from trm_jax.models import layers
from trm_jax.models import trm

TINY = dict(seq_len=8, vocab_size=6, num_puzzle_identifiers=5, hidden_size=32, num_heads=4, expansion=2.0,
            L_layers=2, H_cycles=2, L_cycles=2, puzzle_emb_ndim=32, puzzle_emb_len=2, halt_max_steps=3,
            forward_dtype="float32")


def tiny(**overrides):
  return trm.TRMConfig(**{**TINY, **overrides})


def jitted_call(config, train):
  """``losses.act_call`` jitted for one config (eager dispatch of the scans is slow)."""
  return jax.jit(lambda p, t, c, b, k=None: losses.act_call(config, p, t, c, b, train=train, rng=k))


def tiny_batch(config, batch_size=4, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "inputs": jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, config.seq_len)), jnp.int32),
      "labels": jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, config.seq_len)), jnp.int32),
      "puzzle_identifiers": jnp.asarray(rng.integers(0, config.num_puzzle_identifiers, (batch_size,)), jnp.int32),
  }


@pytest.mark.parametrize("overrides, field", [
    (dict(hidden_size=30, num_heads=4), "hidden_size"),  # head dim 7: odd, no RoPE
    (dict(hidden_size=32, num_heads=40), "num_heads"),
    (dict(pos_encodings="alibi"), "pos_encodings"),
    (dict(puzzle_emb_ndim=100, puzzle_emb_len=2), "puzzle_emb_ndim"),
    (dict(forward_dtype="float16"), "forward_dtype"),
    (dict(loss_type="mse"), "loss_type"),
    (dict(kernels="cuda"), "model.kernels"),
    (dict(remat="all"), "remat"),
    (dict(H_cycles=0), "H_cycles"),
    (dict(halt_exploration_prob=1.5), "halt_exploration_prob"),
])
def test_config_errors_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=field):
    tiny(**overrides)


def test_prefix_length_rule():
  assert tiny(puzzle_emb_len=0, puzzle_emb_ndim=40).puzzle_emb_prefix_len == 2  # ceil(40 / 32)
  assert tiny(puzzle_emb_len=3).num_positions == 8 + 3
  assert tiny(puzzle_emb_len=0, puzzle_emb_ndim=0).num_positions == 8


def test_swiglu_width_rule():
  # ceil_to_multiple(round(expansion * width * 2/3), 256), Python's round.
  assert layers.swiglu_intermediate_size(512, 4) == 1536
  assert layers.swiglu_intermediate_size(64, 4) == 256
  assert layers.swiglu_intermediate_size(97, 4) == 512  # sudoku mlp_t: S + P = 81 + 16
  assert layers.swiglu_intermediate_size(916, 4) == 2560


def test_initialisation():
  config = tiny(hidden_size=64, num_heads=4, puzzle_emb_ndim=64, pos_encodings="learned")
  params = trm.init_params(config, jax.random.key(0))
  np.testing.assert_array_equal(params["q_head_kernel"], 0.0)
  np.testing.assert_array_equal(params["q_head_bias"], -5.0)
  assert trm.init_puzzle_emb(config).shape == (5, 64)
  assert not np.any(trm.init_puzzle_emb(config))
  qkv = np.asarray(params["L_level"]["layers_0"]["self_attn"]["qkv_proj"])
  assert qkv.shape == (64, 192)
  # Truncated at 2 std with the std corrected for the truncation: std 1/sqrt(fan_in).
  # (the original's trunc_normal_init_): the bound is 2 / 0.8796 std.
  assert np.abs(qkv).max() <= 2.0 / 0.87962566 / np.sqrt(64) + 1e-6
  assert np.abs(qkv).max() > 2.0 / np.sqrt(64)
  assert abs(qkv.std() - 1 / np.sqrt(64)) < 0.03 / np.sqrt(64)
  assert abs(layers._truncated_std_factor() - 0.87962566103423978) < 1e-12  # pylint: disable=protected-access
  assert params["embed_pos"].shape == (8 + 2, 64)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_weights_round_trip():
  for overrides in (dict(), dict(mlp_t=True, pos_encodings="none"), dict(pos_encodings="learned")):
    config = tiny(**overrides)
    params = trm.init_params(config, jax.random.key(1))
    table = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    state = weights.export_state_dict(config, params, table)
    assert set(state) == set(weights.original_names(config)) | {weights.PUZZLE_EMB_NAME}
    assert state["inner.lm_head.weight"].shape == (config.vocab_size, 32)  # [out, in]
    params2, table2 = weights.import_state_dict(config, state)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), params2)
    np.testing.assert_array_equal(table, table2)


def test_import_errors_name_the_weight():
  config = tiny()
  state = weights.export_state_dict(config, trm.init_params(config, jax.random.key(1)), np.zeros((5, 32)))
  missing = dict(state)
  del missing["inner.L_level.layers.1.mlp.down_proj.weight"]
  with pytest.raises(ValueError, match=r"missing weight 'inner\.L_level\.layers\.1\.mlp\.down_proj\.weight'"):
    weights.import_state_dict(config, missing)
  wrong = dict(state, **{"inner.q_head.bias": np.zeros(3)})
  with pytest.raises(ValueError, match=r"'inner\.q_head\.bias' has shape \[3\], expected \[2\]"):
    weights.import_state_dict(config, wrong)


def test_jitted_call_compiles_once():
  config = tiny()
  params = trm.init_params(config, jax.random.key(0))
  table = trm.init_puzzle_emb(config)

  def train_call(p, t, c, b, k):
    return losses.act_call(config, p, t, c, b, train=True, rng=k)
  call = jax.jit(train_call)
  batch = tiny_batch(config)
  carry = act.initial_carry(config, batch)
  with compiles.count_compiles() as counts:
    for seed in range(3):
      carry, loss, _, _ = call(params, table, carry, tiny_batch(config, seed=seed), jax.random.key(seed))
      assert np.isfinite(loss)
  assert counts["jit(train_call)"] == 1, counts


def test_the_compile_count_sees_a_recompile():
  """The check above can fail: a call with a new shape compiles again, and is counted."""
  def double(x):
    return 2 * x
  f = jax.jit(double)
  with compiles.count_compiles() as counts:
    f(jnp.ones(3))
    f(jnp.ones(3))
    f(jnp.ones(4))
  assert counts["jit(double)"] == 2, counts


def test_bfloat16_dtypes():
  config = tiny(forward_dtype="bfloat16")
  params = trm.init_params(config, jax.random.key(0))
  batch = tiny_batch(config)
  carry, loss, metrics, outputs = jitted_call(config, False)(params, trm.init_puzzle_emb(config),
                                                             act.initial_carry(config, batch), batch)
  assert carry.latents["z_H"].dtype == jnp.bfloat16 and carry.latents["z_L"].dtype == jnp.bfloat16
  assert outputs["logits"].dtype == jnp.bfloat16
  assert outputs["q_halt_logits"].dtype == jnp.float32
  assert loss.dtype == losses.loss_dtype()
  assert metrics["count"].dtype == jnp.int32


def test_halting_rules():
  config = tiny(halt_max_steps=3, halt_exploration_prob=1.0)
  params = trm.init_params(config, jax.random.key(0))
  # q_halt > 0 for every row: without exploration, training halts at step 1.
  params = dict(params, q_head_bias=jnp.array([5.0, 0.0]))
  table = trm.init_puzzle_emb(config)
  batch = tiny_batch(config, batch_size=64)
  carry = act.initial_carry(config, batch)
  no_explore = dataclasses.replace(config, halt_exploration_prob=0.0)
  c1, *_ = jitted_call(no_explore, True)(params, table, carry, batch)
  assert bool(c1.halted.all())
  # With exploration always on, each row draws min_steps in [2, 3] and so cannot halt at step 1.
  train_call = jitted_call(config, True)
  c1, *_ = train_call(params, table, carry, batch, jax.random.key(3))
  assert not bool(c1.halted.any())
  c2, *_ = train_call(params, table, c1, batch, jax.random.key(4))
  frac = float(c2.halted.mean())  # halts at step 2 iff min_steps == 2: about half the rows
  assert 0.2 < frac < 0.8
  # Evaluation halts only at halt_max_steps.
  c = carry
  eval_call = jitted_call(config, False)
  for step in range(1, 4):
    c, *_ = eval_call(params, table, c, batch)
    assert bool(c.halted.all()) == (step == 3)
  # Exploration needs a key.
  with pytest.raises(ValueError, match="rng"):
    losses.act_call(config, params, table, carry, batch, train=True)


def test_reset_replaces_only_halted_rows():
  config = tiny()
  params = trm.init_params(config, jax.random.key(0))
  old, new = tiny_batch(config, seed=1), tiny_batch(config, seed=2)
  carry = act.initial_carry(config, old)
  carry = act.reset_carry(config, params, carry, old)
  carry = carry.replace(halted=jnp.array([True, False, True, False]), steps=jnp.array([3, 2, 1, 1]),
                        latents=dict(carry.latents, z_H=carry.latents["z_H"] + 1.0))
  reset = act.reset_carry(config, params, carry, new)
  keep = np.array([False, True, False, True])
  np.testing.assert_array_equal(reset.current_data["inputs"][keep], old["inputs"][keep])
  np.testing.assert_array_equal(reset.current_data["inputs"][~keep], new["inputs"][~keep])
  np.testing.assert_array_equal(reset.steps, [0, 2, 0, 1])
  z_H, old_z_H = reset.latents["z_H"], carry.latents["z_H"]
  np.testing.assert_allclose(z_H[0], jnp.broadcast_to(params["H_init"], z_H[0].shape))
  np.testing.assert_allclose(z_H[1], old_z_H[1])


def test_gradients_only_through_last_cycle():
  """H_init never gets a gradient; with H_cycles > 1 the carry gets none either."""
  config = tiny(H_cycles=1)
  params = trm.init_params(config, jax.random.key(0))
  batch = tiny_batch(config)
  carry = act.reset_carry(config, params, act.initial_carry(config, batch), batch)
  grads = jax.jit(jax.grad(lambda p: losses.act_loss(config, p, jnp.ones((4, 32)), carry, train=False)[0]))(params)
  assert not np.any(grads["H_init"]) and not np.any(grads["L_init"])
  assert np.any(grads["lm_head"])

  config = tiny(H_cycles=3)
  z_grad = jax.jit(jax.grad(lambda z: trm.recursion(config, params, dict(carry.latents, z_H=z), batch["inputs"],
                                                    jnp.ones((4, 32)))[1].sum()))(carry.latents["z_H"])
  assert not np.any(z_grad)


@pytest.mark.parametrize("kernels", ["xla", "pallas"])
def test_remat_changes_memory_not_numbers(kernels):
  """Every remat policy gives the same loss, carry and gradients as storing everything."""
  results = {}
  for remat in trm.REMAT_POLICIES:
    config = tiny(remat=remat, kernels=kernels, H_cycles=2)
    params = trm.init_params(tiny(), jax.random.key(0))
    batch = tiny_batch(config)
    carry = act.reset_carry(config, params, act.initial_carry(config, batch), batch)
    rows = jax.random.normal(jax.random.key(1), (4, 32))

    def loss(p, rows, config=config, carry=carry):
      value, (new_carry, _, _) = losses.act_loss(config, p, rows, carry, train=False)
      return value, new_carry.latents["z_H"]
    (value, z_H), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, rows)
    results[remat] = (value, z_H, grads)
  reference = results["none"]
  for remat in ("attention", "network"):
    got_leaves = jax.tree.leaves(results[remat])
    for got, want in zip(got_leaves, jax.tree.leaves(reference)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-6, err_msg=remat)
  assert np.any(reference[2][0]["lm_head"])  # the comparison covers real gradients
