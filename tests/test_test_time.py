"""Evaluation beyond the original (trm_jax.test_time): noisy trajectories, halting, more steps (issue #12)."""

import dataclasses
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import shared_paths
from trm_jax import act
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import errors
from trm_jax import inference
from trm_jax import losses
from trm_jax import models
from trm_jax import steps
from trm_jax import test_time
from trm_jax import train
from trm_jax.models import trm

REPO = shared_paths.REPO_ROOT
B = 8
# The "trained" model: 2 supervision steps. LONGER: the same with eval_halt_max_steps=3.
MODEL = trm.TRMConfig(seq_len=8, vocab_size=6, num_puzzle_identifiers=16, hidden_size=32, num_heads=4,
                      expansion=2.0, L_layers=1, H_cycles=2, L_cycles=2, puzzle_emb_ndim=32, puzzle_emb_len=1,
                      halt_max_steps=2, forward_dtype="float32", halt_exploration_prob=0.0)
LONGER = dataclasses.replace(MODEL, halt_max_steps=3)
# With this Q head, the rows of BATCH first say halt (q_halt > 0) at steps 1, 2 or never within 3.
Q_HALT_BIAS = -9.0


def make_params(q_halt_bias=Q_HALT_BIAS):
  params = trm.init_params(MODEL, jax.random.PRNGKey(0))
  params["q_head_kernel"] = jax.random.normal(jax.random.PRNGKey(1), (MODEL.hidden_size, 2))
  params["q_head_bias"] = jnp.array([q_halt_bias, 0.0])
  return params


TABLE = jax.random.normal(jax.random.PRNGKey(2), (MODEL.num_puzzle_identifiers, MODEL.puzzle_emb_ndim))
_rng = np.random.default_rng(0)
BATCH = {"inputs": jnp.asarray(_rng.integers(1, 6, (B, 8)), jnp.int32),
         "labels": jnp.asarray(_rng.integers(1, 6, (B, 8)), jnp.int32),
         "puzzle_identifiers": jnp.arange(1, B + 1, dtype=jnp.int32)}


def jit_eval(fn):
  return jax.jit(lambda p: fn(p, TABLE, BATCH))


@pytest.fixture(scope="module")
def reference():
  """The original's ACT calls one by one, 3 steps: each step's preds and Q logits ``[B, 3]``."""
  params = make_params()
  call = jax.jit(lambda c: losses.act_call(LONGER, params, TABLE, c, BATCH, train=False))
  carry = act.initial_carry(LONGER, BATCH)
  preds, q_halt = [], []
  for _ in range(3):
    carry, _, _, out = call(carry)
    preds.append(np.asarray(out["preds"]))
    q_halt.append(np.asarray(out["q_halt_logits"]))
  return np.stack(preds, 1), np.stack(q_halt, 1)


@pytest.fixture(scope="module")
def original():
  """Today's evaluation of BATCH: ``steps.eval_step`` (2 steps)."""
  return jit_eval(functools.partial(steps.eval_step, model=MODEL))(make_params())


def test_default_options_run_the_original_eval_step():
  step = test_time.make_eval_step(MODEL, test_time.EvalOptions())
  assert step.func is steps.eval_step and step.keywords == {"model": MODEL}
  assert test_time.EvalOptions().tag == ""
  # More steps alone: still the original loop, on the model with more steps.
  longer = test_time.make_eval_step(MODEL, test_time.EvalOptions(halt_max_steps=3))
  assert longer.func is steps.eval_step and longer.keywords["model"] == LONGER


@pytest.mark.parametrize("k", [1, 4])
def test_trajectories_without_noise_are_todays_evaluation(original, k):
  """K=1, sigma=0 through the general loop: bit for bit. K=4 without noise: four copies of it (the same up to
  rounding: a 4x larger batch may round matmuls differently)."""
  metrics, outputs = jit_eval(functools.partial(
      test_time.eval_step, model=MODEL, options=test_time.EvalOptions(trajectories=k)))(make_params())
  ref_metrics, ref_outputs = original
  assert set(metrics) == set(ref_metrics) | {"compute_steps"}
  for key, value in ref_metrics.items():
    if k == 1:
      assert np.asarray(metrics[key]).tobytes() == np.asarray(value).tobytes(), key
    else:
      np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(outputs["preds"], ref_outputs["preds"])
  if k == 1:
    np.testing.assert_array_equal(outputs["q_halt_logits"], ref_outputs["q_halt_logits"])
  else:
    np.testing.assert_allclose(outputs["q_halt_logits"], ref_outputs["q_halt_logits"], rtol=1e-5, atol=1e-5)
  assert int(metrics["compute_steps"]) == B * MODEL.halt_max_steps * k


def test_more_supervision_steps_at_evaluation(reference):
  metrics, outputs = jit_eval(test_time.make_eval_step(MODEL, test_time.EvalOptions(halt_max_steps=3)))(
      make_params())
  ref_preds, ref_q = reference
  assert int(metrics["steps"]) == 3 * B
  np.testing.assert_array_equal(outputs["preds"], ref_preds[:, 2])
  np.testing.assert_allclose(outputs["q_halt_logits"], ref_q[:, 2], rtol=1e-6, atol=1e-6)


def test_halting_freezes_each_row_at_its_first_halt(reference):
  ref_preds, ref_q = reference
  said_halt = ref_q > 0
  first = np.where(said_halt.any(1), said_halt.argmax(1) + 1, 3)  # supervision steps each row uses
  assert set(first) == {1, 2, 3}, first  # the case covers each kind of row
  fn = jit_eval(test_time.make_eval_step(MODEL, test_time.EvalOptions(halt=True, halt_max_steps=3)))
  metrics, outputs = fn(make_params())
  rows = np.arange(B)
  np.testing.assert_array_equal(outputs["preds"], ref_preds[rows, first - 1])
  np.testing.assert_allclose(outputs["q_halt_logits"], ref_q[rows, first - 1], rtol=1e-6, atol=1e-6)
  assert int(metrics["steps"]) == first.sum() < 3 * B
  assert int(metrics["compute_steps"]) == 3 * B  # one row never halts: the batch runs all 3
  correct = (ref_preds[rows, first - 1] == np.asarray(BATCH["labels"])).all(1)
  assert int(metrics["exact_accuracy"]) == correct.sum()
  # Every row halts after its first step: the batch stops there.
  metrics, _ = fn(make_params(q_halt_bias=100.0))
  assert int(metrics["steps"]) == int(metrics["compute_steps"]) == B


def test_noisy_trajectories_report_the_most_confident(original):
  options = test_time.EvalOptions(trajectories=4, noise_sigma=0.5)
  run = jit_eval(functools.partial(test_time.run_trajectories, model=MODEL, options=options))
  kept, used, calls = run(make_params())
  q_BxK = np.asarray(kept["q_halt_logits"]).reshape(B, 4)
  preds_BxKxS = np.asarray(jnp.argmax(kept["logits"], -1)).reshape(B, 4, -1)
  # The noise sends each input's trajectories different ways (noise-free, all four would be today's).
  assert all(len(set(np.round(q, 5))) == 4 for q in q_BxK)
  assert not np.allclose(q_BxK[:, 0], original[1]["q_halt_logits"], atol=1e-3)
  assert int(calls) == 2 and (np.asarray(used) == 2).all()
  np.testing.assert_array_equal(run(make_params())[0]["logits"], kept["logits"])  # deterministic
  # The reported answer: the trajectory with the largest q_halt, scored as usual.
  metrics, outputs = jax.jit(functools.partial(test_time.report, MODEL, 4))(kept, used, calls, BATCH["labels"])
  best = q_BxK.argmax(1)
  np.testing.assert_array_equal(outputs["q_halt_logits"], q_BxK[np.arange(B), best])
  np.testing.assert_array_equal(outputs["preds"], preds_BxKxS[np.arange(B), best])
  chosen = {k: np.asarray(v).reshape((B, 4) + v.shape[1:])[np.arange(B), best] for k, v in kept.items()}
  _, ref_metrics, _ = losses.loss_and_metrics(MODEL, chosen, BATCH["labels"], jnp.ones(B, bool), jnp.full(B, 2))
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)
  assert int(metrics["count"]) == B and int(metrics["steps"]) == 2 * B
  assert int(metrics["compute_steps"]) == B * 2 * 4
  correct = (preds_BxKxS[np.arange(B), best] == np.asarray(BATCH["labels"])).all(1)
  assert int(metrics["exact_accuracy"]) == correct.sum()


def test_noise_depends_on_seed_input_trajectory_step_and_latent_only():
  k, shape = 3, (B * 3, 5, 4)
  zeros = {"z_H": jnp.zeros(shape, jnp.bfloat16), "z_L": jnp.zeros(shape, jnp.bfloat16)}
  order = ("z_H", "z_L")

  def noise(seed=0, inputs=BATCH["inputs"], ids=BATCH["puzzle_identifiers"], step=0, names=order):
    keys = test_time.trajectory_keys(seed, inputs, ids, k)
    return {n: np.asarray(z, np.float32) for n, z in
            test_time.add_noise(zeros, keys, jnp.int32(step), 2.0, names, order).items()}
  base = noise()
  assert base["z_H"].dtype == np.float32 and 1.5 < base["z_L"].std() < 2.5
  np.testing.assert_array_equal(noise()["z_L"], base["z_L"])
  for other in (noise(seed=1), noise(step=1)):
    assert not np.allclose(other["z_L"], base["z_L"])
  assert not np.allclose(base["z_H"], base["z_L"])
  z_L = base["z_L"].reshape(B, k, 5, 4)
  assert not np.allclose(z_L[:, 0], z_L[:, 1])  # trajectories differ
  only_l = noise(names=("z_L",))
  assert not only_l["z_H"].any() and np.array_equal(only_l["z_L"], base["z_L"])
  # Moving an input to another batch position moves its noise with it.
  perm = np.roll(np.arange(B), 3)
  moved = noise(inputs=BATCH["inputs"][perm], ids=BATCH["puzzle_identifiers"][perm])
  np.testing.assert_array_equal(moved["z_L"].reshape(B, k, 5, 4), z_L[perm])


@pytest.mark.parametrize("arch", ["hrm", "trm_singlez"])
def test_other_architectures(arch):
  """Trajectories, noise and halting go through the seam (no architecture is named outside its module): hrm
  (two networks, halting on q_halt > q_continue) and trm_singlez (one latent) run them as trm above."""
  model = models.config_from_dict(dict(
      arch=arch, seq_len=8, vocab_size=6, num_puzzle_identifiers=16, hidden_size=16, num_heads=2, expansion=2.0,
      L_layers=1, H_layers=1, H_cycles=1, L_cycles=1, puzzle_emb_ndim=16, puzzle_emb_len=1, halt_max_steps=2,
      forward_dtype="float32"))
  params = models.of(model).init_params(model, jax.random.PRNGKey(0))
  params["q_head_kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["q_head_kernel"].shape)
  params["q_head_bias"] = jnp.zeros(2)
  table = jax.random.normal(jax.random.PRNGKey(2), (16, 16))
  options = test_time.EvalOptions(trajectories=2, noise_sigma=1.0, halt=True)
  kept, used, calls = jax.jit(functools.partial(test_time.run_trajectories, model=model, options=options))(
      params, table, BATCH)
  q_BxK = np.asarray(kept["q_halt_logits"]).reshape(B, 2)
  assert np.isfinite(q_BxK).all() and not np.allclose(q_BxK[:, 0], q_BxK[:, 1], atol=1e-4)
  assert 1 <= int(calls) <= 2 and ((1 <= np.asarray(used)) & (np.asarray(used) <= int(calls))).all()


def config_with(**overrides):
  from trm_jax.configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.mark.parametrize("key, value, expected", [
    ("eval_trajectories", 0, "an integer >= 1"),
    ("eval_noise_sigma", -0.1, "a finite number >= 0"),
    ("eval_noise_sigma", float("nan"), "a finite number >= 0"),
    ("eval_noise_latents", "z_L,z_X", "['z_X'] not a latent of arch='trm'"),
    ("eval_noise_seed", -1, "an integer in [0, 2**31)"),
    ("eval_halt_max_steps", -1, "an integer >= 0"),
])
def test_bad_options_are_one_line_errors_naming_the_key(key, value, expected):
  with pytest.raises(errors.UserError) as info:
    test_time.options_from_config(config_with(**{key: value}), MODEL)
  message = str(info.value)
  assert message.startswith(f"{key}=") and expected in message and "\n" not in message


def test_options_from_config():
  options = test_time.options_from_config(config_with(
      eval_trajectories=16, eval_noise_sigma=0.25, eval_noise_latents=" z_L ", eval_noise_seed=3, eval_halt=True,
      eval_halt_max_steps=32), MODEL)
  assert options == test_time.EvalOptions(16, 0.25, ("z_L",), 3, True, 32)
  assert options.tag == "K16_sigma0.25_noise-z_L_seed3_halt_steps32"
  assert test_time.options_from_config(config_with(), MODEL) == test_time.EvalOptions()
  # Not structural: a checkpoint written before these keys existed accepts them.
  current = checkpoint_lib.config_to_dict(config_with(eval_trajectories=16, eval_halt=True))
  saved = {k: v for k, v in current.items() if not k.startswith("eval_") or k == "eval_batch_size"}
  checkpoint_lib.check_compatible(saved, current, "checkpoint")


# ---------------------------------------------------------------------------
# --mode=eval on a trained checkpoint, and sharded over 8 CPU devices.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  from data_prep import sudoku  # pylint: disable=g-import-not-at-top
  from test_train import tiny_config  # pylint: disable=g-import-not-at-top
  data = tmp_path_factory.mktemp("data") / "sudoku"
  sudoku.build_generated(data, num_train=16, num_test=12, num_aug=1, seed=0, target_clues=50)
  workdir = tmp_path_factory.mktemp("run")
  summary = train.train_and_evaluate(tiny_config(data, epochs=1, eval_interval=1), workdir)
  return data, workdir, summary, tiny_config


def test_eval_mode_applies_the_options_to_a_trained_checkpoint(tiny_run):
  data, workdir, summary, tiny_config = tiny_run
  config = tiny_config(data, epochs=1, eval_interval=1, eval_trajectories=2, eval_noise_sigma=0.2, eval_halt=True,
                       eval_halt_max_steps=3)
  results = inference.evaluate_checkpoint(config, workdir)
  out = workdir / "eval" / f"ckpt_{summary['end_step']}_K2_sigma0.2_halt_steps3" / "results.json"
  assert out.is_file()
  assert results["all/count"] == summary["last_eval"]["all/count"]
  assert 1 <= results["all/steps"] <= 3 and 2 <= results["all/compute_steps"] <= 2 * 3
  assert 0 <= results["all/exact_accuracy"] <= 1


def test_bad_option_on_the_command_line_is_one_line(tiny_run):
  data, workdir, _, _ = tiny_run
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
  proc = subprocess.run([sys.executable, str(REPO / "launch.py"), "--config=configs/quickstart.py",
                         f"--config.data_path={data}", "--config.data_build=", "--mode=eval",
                         "--config.eval_noise_sigma=-1", f"--workdir={workdir}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: eval_noise_sigma=-1.0: expected a finite number >= 0 (the noise's standard deviation)"]


def test_sharded_evaluation_matches_one_device():
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_test_time.py")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "same on 1 and 8 devices" in proc.stdout, proc.stdout
