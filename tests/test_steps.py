"""The jitted train and eval steps (SPEC §4–§6)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import compiles
import shared_paths
from trm_jax import act
from trm_jax import losses
from trm_jax import optim
from trm_jax import state as state_lib
from trm_jax import steps
from trm_jax import weights
from trm_jax.models import trm

B = 16
MODEL = trm.TRMConfig(seq_len=8, vocab_size=6, num_puzzle_identifiers=40, hidden_size=32, num_heads=4,
                      expansion=2.0, L_layers=1, H_cycles=2, L_cycles=2, puzzle_emb_ndim=32, puzzle_emb_len=1,
                      halt_max_steps=2, forward_dtype="float32", halt_exploration_prob=0.0)


def make_optimizers(total_steps=300, **kw):
  args = dict(lr=3e-3, weight_decay=0.01, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, beta1=0.9, beta2=0.95,
              warmup_steps=10, total_steps=total_steps, lr_min_ratio=1.0, trainable_mask=state_lib.trainable_mask)
  return optim.make_optimizers(**{**args, **kw})


def fixed_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.integers(1, 6, (B, 8)), jnp.int32),
          "labels": jnp.asarray(rng.integers(1, 6, (B, 8)), jnp.int32),
          "puzzle_identifiers": jnp.asarray(rng.integers(1, 8, (B,)), jnp.int32)}


@pytest.fixture(scope="module")
def overfit_run():
  # (No weight decay and a moderate lr: the fit is then steady under jax 0.11 and 0.12 alike.)
  opt = make_optimizers(total_steps=400, lr=1e-3, weight_decay=0.0)
  state = state_lib.create_train_state(MODEL, opt, seed=0, ema=True)
  batch = fixed_batch()
  carry = act.initial_carry(MODEL, batch)
  step = jax.jit(steps.make_train_step(MODEL, opt, B, ema_rate=0.999), donate_argnums=(0, 1))
  lm_losses = []
  with compiles.count_compiles() as compile_counts:
    for _ in range(400):
      state, carry, metrics = step(state, carry, batch)
      lm_losses.append(metrics["lm_loss"])
  return compile_counts, state, [float(x) for x in jax.device_get(lm_losses)]


def test_overfits_one_batch(overfit_run):
  _, _, lm_losses = overfit_run
  assert np.mean(lm_losses[-10:]) < 0.1 * lm_losses[0], (lm_losses[0], lm_losses[-10:])
  assert max(lm_losses[-50:]) < 0.2 * lm_losses[0]  # and it stays down


def test_train_step_compiles_once(overfit_run):
  compile_counts, state, _ = overfit_run
  # The first call compiles; the 399 others (donated, re-fed outputs) reuse it.
  assert compile_counts["jit(train_step)"] == 1, compile_counts
  assert int(state.step) == 400


def test_ema_and_frozen_leaves(overfit_run):
  _, state, _ = overfit_run
  init = state_lib.create_train_state(MODEL, make_optimizers(), seed=0, ema=True)
  # H_init / L_init never change; EMA lags the parameters.
  np.testing.assert_array_equal(state.params["H_init"], init.params["H_init"])
  np.testing.assert_array_equal(state.params["L_init"], init.params["L_init"])
  assert not np.allclose(state.ema_params["lm_head"], state.params["lm_head"])
  assert state_lib.eval_params(state) is state.ema_params


def test_puzzle_rows_outside_batch_untouched(overfit_run):
  _, state, _ = overfit_run
  ids = np.unique(np.asarray(fixed_batch()["puzzle_identifiers"]))
  table = np.asarray(state.puzzle_emb)
  others = np.setdiff1d(np.arange(MODEL.num_puzzle_identifiers), ids)
  assert not np.any(table[others])  # zero init, never updated
  assert np.all(np.any(table[ids] != 0, axis=1))


def test_one_step_by_hand():
  """train_step = loss_and_grads + AdamATan2 + sparse SignSGD + EMA, at update index 1."""
  opt = make_optimizers()
  state = state_lib.create_train_state(MODEL, opt, seed=1, ema=True)
  state = state.replace(puzzle_emb=jnp.asarray(np.random.default_rng(0).standard_normal((40, 32)), jnp.float32))
  batch = fixed_batch(1)
  carry = act.initial_carry(MODEL, batch)
  new_state, _, metrics = jax.jit(steps.make_train_step(MODEL, opt, B, ema_rate=0.9))(state, carry, batch)
  rng = jax.random.fold_in(state.rng, 0)

  @jax.jit
  def by_hand(state):
    _, _, grads, (ids, row_grads) = steps.loss_and_grads(MODEL, state.params, state.puzzle_emb, carry, batch,
                                                         rng, B)
    updates, _ = opt.dense.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), ids, row_grads
  params, ids, row_grads = by_hand(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.params, params)
  table = optim.sparse_sign_sgd_update(state.puzzle_emb, ids, row_grads, opt.puzzle_emb_lr_schedule(1), 0.1)
  np.testing.assert_allclose(new_state.puzzle_emb, table, rtol=1e-6)
  ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_state.ema_params, ema)
  assert float(metrics["lr"]) == pytest.approx(3e-3 / 10)
  assert float(metrics["puzzle_emb_lr"]) == pytest.approx(1e-2 / 10)


def test_freeze_weights_trains_only_puzzle_embedding():
  opt = make_optimizers(freeze_weights=True)
  state = state_lib.create_train_state(MODEL, opt, seed=0, ema=False)
  batch = fixed_batch()
  new_state, _, _ = jax.jit(steps.make_train_step(MODEL, opt, B, ema_rate=None))(
      state, act.initial_carry(MODEL, batch), batch)
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  assert np.any(np.asarray(new_state.puzzle_emb) != 0)


def test_gradients_match_golden_divided_by_batch_size():
  data = np.load(shared_paths.GOLDEN_DIR / "trm_attn_rope.npz")
  cfg = json.loads(str(data["config_json"]))
  model = trm.TRMConfig.from_dict(cfg)
  params, table = weights.import_state_dict(model, {k[6:]: data[k] for k in data.files if k.startswith("param/")})
  batch = {k: jnp.asarray(data[f"batch/{k}"], jnp.int32) for k in act.BATCH_KEYS}
  bs = cfg["batch_size"]
  with jax.default_matmul_precision("highest"):
    _, _, grads, (_, row_grads) = jax.jit(steps.loss_and_grads, static_argnums=(0, 6))(
        model, params, table, act.initial_carry(model, batch), batch, jax.random.PRNGKey(0), bs)
  grads_by_name = weights.export_state_dict(model, grads, None)
  for name in weights.trainable_original_names(model):
    ours = grads_by_name[name]
    ref = data[f"grad/{name}"] / bs
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max(), name
  ref = data["grad/puzzle_emb_local"] / bs
  assert np.abs(row_grads - ref).max() <= 1e-3 * np.abs(ref).max()


def test_eval_step_runs_all_steps():
  params = trm.init_params(MODEL, jax.random.PRNGKey(0))
  table = trm.init_puzzle_emb(MODEL)
  batch = fixed_batch()
  metrics, outputs = jax.jit(lambda p, t, b: steps.eval_step(p, t, b, model=MODEL))(params, table, batch)
  # The same as halt_max_steps explicit calls.
  carry = act.initial_carry(MODEL, batch)
  call = jax.jit(lambda c: losses.act_call(MODEL, params, table, c, batch, train=False))
  for _ in range(MODEL.halt_max_steps):
    carry, _, ref_metrics, ref_outputs = call(carry)
  assert int(metrics["count"]) == B  # every row halted with labels
  for k in ref_metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
  np.testing.assert_array_equal(outputs["preds"], ref_outputs["preds"])
  reported = steps.eval_metrics_to_host(steps.sum_metrics(steps.sum_metrics(None, metrics), metrics))
  assert reported["count"] == 2 * B
  assert reported["steps"] == pytest.approx(MODEL.halt_max_steps)
