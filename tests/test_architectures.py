"""Every architecture of the registry through the whole project: the trainer
(train, evaluate, checkpoint, resume), original-named weights both ways,
every remat policy, and the ACT rules of SPEC §11. (The golden files check
each architecture against the original with xla and pallas kernels:
tests/test_golden.py; a mesh: tests/test_sharding.py.)

The configs are tiny and use 3 heads at width 30 (head dim 10, attention
inner width 30 = hidden_size) or at width 32 (inner width 30 < 32: the
original's rule for heads that do not divide the width).
"""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trm_jax import act
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import inference
from trm_jax import losses
from trm_jax import models
from trm_jax import runs
from trm_jax import train
from trm_jax import weights
from trm_jax.models import base

import test_train

ARCHS = tuple(models.ARCHITECTURES)


def run_config(data_path, arch, **overrides):
  """The trainer's tiny sudoku config, attention blocks, 3 heads at width 32."""
  return test_train.tiny_config(data_path, **{
      "model.arch": arch, "model.mlp_t": False, "model.pos_encodings": "rope", "model.num_heads": 3,
      "model.H_layers": 1, **overrides})


def model_config(arch, **overrides):
  fields = dict(arch=arch, seq_len=6, vocab_size=5, num_puzzle_identifiers=4, hidden_size=32, num_heads=3,
                expansion=2.0, L_layers=1, H_layers=1, H_cycles=2, L_cycles=2, puzzle_emb_ndim=32,
                puzzle_emb_len=2, halt_max_steps=3, forward_dtype="float32", halt_exploration_prob=0.0)
  return models.config_from_dict({**fields, **overrides})


def random_batch(config, batch_size=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"inputs": jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, config.seq_len)), jnp.int32),
          "labels": jnp.asarray(rng.integers(0, config.vocab_size, (batch_size, config.seq_len)), jnp.int32),
          "puzzle_identifiers": jnp.asarray(rng.integers(0, config.num_puzzle_identifiers, (batch_size,)),
                                            jnp.int32)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("data") / "sudoku"
  sudoku.build_generated(path, num_train=16, num_test=8, num_aug=1, seed=0, target_clues=50)
  return path


@pytest.mark.parametrize("arch", ARCHS)
def test_train_resume_export_round_trip(arch, data, tmp_path):
  full = train.train_and_evaluate(run_config(data, arch), tmp_path / "full")
  assert full["end_step"] > 3 and full["last_eval"]["all/count"] == 8
  # The same run stopped after its previous checkpoint (a copy without the
  # last one), then the same command again: bit-identical.
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  saved = sorted(int(p.name) for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.name.isdigit())
  assert len(saved) == 2 and saved[-1] == full["end_step"], saved
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / str(saved[-1]))
  second = train.train_and_evaluate(run_config(data, arch), tmp_path / "resumed")
  assert second["start_step"] == saved[0]
  state_a = test_train.assert_same_run(tmp_path / "full", full, tmp_path / "resumed", second)
  # Another architecture's checkpoint is refused by name.
  other = ARCHS[(ARCHS.index(arch) + 1) % len(ARCHS)]
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="model.arch"):
    train.train_and_evaluate(run_config(data, other), tmp_path / "full")

  # Export: the original's names (the EMA copy, quickstart has EMA on), and back.
  path = inference.export_weights(run_config(data, arch), tmp_path / "full", tmp_path / "weights.npz")
  run = runs.setup(run_config(data, arch), tmp_path / "full", need_train=False)
  with np.load(path) as z:
    exported = {k: z[k] for k in z.files}
  assert set(exported) == set(weights.original_names(run.model)) | {weights.PUZZLE_EMB_NAME}
  assert {f"inner.{init}" for init in models.of(run.model).init_names} <= set(exported)
  params, table = weights.import_state_dict(run.model, exported)
  jax.tree.map(np.testing.assert_array_equal, params, jax.tree.map(np.asarray, state_a["ema_params"]))
  np.testing.assert_array_equal(table, np.asarray(state_a["puzzle_emb"])[:run.model.num_puzzle_identifiers])


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "trm"])  # trm: tests/test_model.py
def test_remat_policies_agree(arch):
  """Loss, new latents and every gradient with each application of a level
  recomputed, in training mode (HRM's target forward included). ("attention"
  recomputes inside the shared block, tested with trm in tests/test_model.py;
  the Pallas kernels run every architecture's golden file in tests/test_golden.py.)"""
  reference = model_config(arch, L_cycles=1)
  arch_ = models.of(reference)
  params = arch_.init_params(reference, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)  # q head too
  batch = random_batch(reference)
  rows = jax.random.normal(jax.random.key(2), (3, 32))
  results = {}
  for remat in ("none", "network"):
    config = dataclasses.replace(reference, remat=remat)
    carry = act.reset_carry(config, params, act.initial_carry(config, batch), batch)

    def loss(p, r, config=config, carry=carry):
      value, (new_carry, _, _) = losses.act_loss(config, p, r, carry, train=True)
      return value, new_carry.latents
    results[remat] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, rows)
  want = results["none"]
  assert np.any(want[1][0]["lm_head"]) and np.any(want[1][1])
  for remat, got in results.items():
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6, err_msg=remat)


def test_attention_with_heads_not_dividing_the_width():
  """12 heads at 512 (the baseline's paper setting): head dim 42, inner width 504."""
  config = model_config("transformers_baseline", hidden_size=512, num_heads=12, puzzle_emb_ndim=512, H_layers=1)
  assert config.head_dim == 42
  shapes = jax.eval_shape(lambda: models.of(config).init_params(config, jax.random.key(0)))
  attn = shapes["H_level"]["layers_0"]["self_attn"]
  assert attn["qkv_proj"].shape == (512, 3 * 504) and attn["o_proj"].shape == (504, 512)
  names = dict((n, s) for n, _, s in weights._linear_names(config))  # pylint: disable=protected-access
  assert names["inner.H_level.layers.0.self_attn.qkv_proj.weight"] == (512, 1512)
  assert names["inner.H_level.layers.0.self_attn.o_proj.weight"] == (504, 512)


def test_latents_reset_to_their_own_vectors():
  for arch in ARCHS:
    config = model_config(arch)
    a = models.of(config)
    params = a.init_params(config, jax.random.key(0))
    batch = random_batch(config)
    carry = act.reset_carry(config, params, act.initial_carry(config, batch), batch)
    assert tuple(sorted(carry.latents)) == tuple(sorted(a.latent_names))
    for name, init in a.latents:
      np.testing.assert_array_equal(carry.latents[name], jnp.broadcast_to(params[init], carry.latents[name].shape))
    assert set(a.init_names) <= set(models.FROZEN_PARAMS)
  # trm_hier6 with 2 L cycles: latents 3 to 6 keep their reset values.
  config = model_config("trm_hier6", L_cycles=2)
  params = models.of(config).init_params(config, jax.random.key(0))
  batch = random_batch(config)
  carry, *_ = losses.act_call(config, params, base.init_puzzle_emb(config), act.initial_carry(config, batch), batch,
                              train=False)
  for k in range(1, 7):
    unchanged = np.array_equal(carry.latents[f"z_L{k}"], jnp.broadcast_to(params[f"L{k}_init"], (3, 8, 32)))
    assert unchanged == (k > 2), k


def _halting(arch, q_halt, q_continue, **overrides):
  """Halted rows after one training call with the Q head fixed to (q_halt, q_continue)."""
  config = model_config(arch, **overrides)
  a = models.of(config)
  params = a.init_params(config, jax.random.key(0))
  params = dict(params, q_head_kernel=jnp.zeros_like(params["q_head_kernel"]),
                q_head_bias=jnp.array([q_halt, q_continue]))
  batch = random_batch(config)
  carry = act.initial_carry(config, batch)
  new_carry, _, metrics, outputs = losses.act_call(config, params, base.init_puzzle_emb(config), carry, batch,
                                                   train=True)
  return bool(new_carry.halted.all()), metrics, outputs


@pytest.mark.parametrize("arch, rule, target", [
    ("trm", "q_halt > 0", False), ("trm_singlez", "q_halt > 0", False), ("trm_hier6", "q_halt > 0", False),
    ("hrm", "q_halt > q_continue", True), ("transformers_baseline", "q_halt > q_continue", False)])
def test_act_flavours(arch, rule, target):
  """SPEC §11: which comparison halts, and who learns the Q-continue target."""
  # q_halt = 1 > 0 but < q_continue = 2: only the "q_halt > 0" rule halts.
  halted, metrics, outputs = _halting(arch, 1.0, 2.0)
  assert halted == (rule == "q_halt > 0")
  # q_halt = -1 < 0 but > q_continue = -2: only the "q_halt > q_continue" rule halts.
  halted, _, _ = _halting(arch, -1.0, -2.0)
  assert halted == (rule == "q_halt > q_continue")
  assert ("target_q_continue" in outputs) == target
  assert ("q_continue_loss" in metrics) == target


def test_trm_without_no_act_continue():
  """no_ACT_continue=False (SPEC §4): halting on q_halt > q_continue and the target's loss."""
  halted, metrics, outputs = _halting("trm", 1.0, 2.0, no_ACT_continue=False)
  assert not halted and "q_continue_loss" in metrics
  # The target is sigmoid of the next step's Q values (the fixed head gives 1 and 2): max -> 2.
  np.testing.assert_allclose(outputs["target_q_continue"], jax.nn.sigmoid(2.0) * np.ones(3), rtol=1e-6)
  halted, _, _ = _halting("trm", -1.0, -2.0, no_ACT_continue=False)
  assert halted


def test_arch_config_errors():
  with pytest.raises(ValueError, match=r"arch='hrn': expected one of \('trm', "):
    model_config("hrn")
  with pytest.raises(ValueError, match="L_cycles=7.*at most 6"):
    model_config("trm_hier6", L_cycles=7)
  with pytest.raises(ValueError, match="H_layers=0.*H_level"):
    model_config("hrm", H_layers=0)
  with pytest.raises(ValueError, match="mlp_t"):
    model_config("transformers_baseline", mlp_t=True)
  with pytest.raises(ValueError, match="pos_encodings"):
    model_config("transformers_baseline", pos_encodings="none")
  # HRM and the baseline have no puzzle_emb_len: P = ceil(puzzle_emb_ndim / hidden_size).
  assert model_config("hrm", puzzle_emb_len=16, puzzle_emb_ndim=40).puzzle_emb_prefix_len == 2
  assert model_config("trm", puzzle_emb_len=16).puzzle_emb_prefix_len == 16


def test_paper_settings_in_one_step():
  hrm = test_train.load_config("configs/sudoku.py", "att,hrm")
  assert (hrm.model.arch, hrm.model.H_layers, hrm.model.L_layers, hrm.model.H_cycles, hrm.model.L_cycles,
          hrm.model.mlp_t) == ("hrm", 4, 4, 2, 2, False)
  baseline = test_train.load_config("configs/arc.py", "transformers_baseline")
  assert (baseline.model.arch, baseline.model.H_layers, baseline.model.num_heads, baseline.model.hidden_size,
          baseline.data_path) == ("transformers_baseline", 8, 12, 512, "data/arc1concept-aug-1000")
  hier6 = test_train.load_config("configs/maze.py", "trm_hier6")
  assert (hier6.model.arch, hier6.model.L_cycles, hier6.model.H_cycles) == ("trm_hier6", 4, 3)
  quick = test_train.load_config("configs/quickstart.py", "maze,transformers_baseline")
  assert (quick.model.arch, quick.model.H_layers, quick.model.num_heads, quick.model.hidden_size) == (
      "transformers_baseline", 8, 4, 64)
  assert test_train.load_config("configs/default.py", "hrm").model.arch == "hrm"
  assert test_train.load_config("configs/sudoku.py").model.arch == "trm"
  with pytest.raises(ValueError, match="unknown variant 'att,hrn'"):
    test_train.load_config("configs/sudoku.py", "att,hrn")
  with pytest.raises(ValueError, match="unknown variant"):
    test_train.load_config("configs/maze.py", "hrm,trm")
