"""Depth curriculum and per-supervision-step loss weights (issue #12, item 3; trm_jax.curriculum)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_train import assert_same_run
from test_train import sudoku_data  # pylint: disable=unused-import  (a module fixture)
from test_train import tiny_config
from trm_jax import act
from trm_jax import checkpoint as checkpoint_lib
from trm_jax import curriculum
from trm_jax import errors
from trm_jax import losses
from trm_jax import models
from trm_jax import steps
from trm_jax import train


def model_config(arch="trm", **fields):
  return models.config_from_dict(dict(arch=arch, seq_len=4, vocab_size=5, num_puzzle_identifiers=3, hidden_size=8,
                                      num_heads=2, H_layers=1, puzzle_emb_ndim=8, puzzle_emb_len=1,
                                      forward_dtype="float32", **fields))


def test_the_stage_of_each_step():
  schedule = curriculum.make_schedule("1x2@0, 2x4@0.3, 3x6@0.6", model_config(), total_steps=10)
  assert [(s.H_cycles, s.L_cycles, s.start_step) for s in schedule.stages] == [(1, 2, 0), (2, 4, 3), (3, 6, 6)]
  assert [schedule.stage_index(step) for step in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
  assert [(m.H_cycles, m.L_cycles) for m in (s.model for s in schedule.stages)] == [(1, 2), (2, 4), (3, 6)]
  assert schedule.stages[1].model.hidden_size == 8  # everything but the cycles is the run's model
  assert curriculum.make_schedule("", model_config(), total_steps=10) is None


@pytest.mark.parametrize("text, arch, message", [
    ("2x4@0.3", "trm", "the first stage starts at 0.3, not 0"),
    ("1x2@0,3x6@0.6,2x4@0.3", "trm", r"stage '2x4@0\.3' is out of order"),
    ("1x2@0,2x4@0", "trm", r"stage '2x4@0' is out of order"),
    ("0x2@0", "trm", "cycles < 1"),
    ("1x0@0", "trm", "cycles < 1"),
    ("1x2@0,2x4@1", "trm", r"starts at 1, outside \[0, 1\)"),
    ("1x2@-0.5", "trm", r"outside \[0, 1\)"),
    ("1x2", "trm", "cannot read stage '1x2'"),
    ("1x2@0,,2x4@0.5", "trm", "cannot read stage ''"),
    ("1x2@0,2x4@0.5", "transformers_baseline", "model.arch='transformers_baseline' has no cycles"),
    ("1x2@0,2x7@0.5", "trm_hier6", r"stage 2x7: model\.L_cycles=7: expected at most 6"),
])
def test_a_schedule_that_cannot_work_is_a_one_line_error_naming_the_key(text, arch, message):
  with pytest.raises(errors.UserError, match=message) as info:
    curriculum.make_schedule(text, model_config(arch), total_steps=10)
  assert str(info.value).startswith(f"config.depth_schedule={text!r}: ")
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("decay", [0.0, -0.7, float("nan"), float("inf")])
def test_a_bad_step_loss_decay_is_a_one_line_error(decay):
  with pytest.raises(errors.UserError, match=r"config\.step_loss_decay=.*expected a positive number"):
    curriculum.check_step_loss_decay(decay)


def test_setup_refuses_a_bad_schedule_before_compiling(sudoku_data, tmp_path):
  with pytest.raises(errors.UserError, match=r"config\.depth_schedule='3x3@0\.5': the first stage"):
    train.train_and_evaluate(tiny_config(sudoku_data, depth_schedule="3x3@0.5"), tmp_path)
  with pytest.raises(errors.UserError, match=r"config\.step_loss_decay=0\.0"):
    train.train_and_evaluate(tiny_config(sudoku_data, step_loss_decay=0.0), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_resume_refuses_another_schedule_unless_allowed():
  saved = {"config": {"depth_schedule": "1x1@0,2x1@0.5", "step_loss_decay": 1.0, "model": {"H_cycles": 2}}}
  config = {"depth_schedule": "1x1@0,2x1@0.6", "step_loss_decay": 0.7, "model": {"H_cycles": 2},
            "resume_allow_changes": ""}
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError,
                     match=r"depth_schedule: checkpoint '1x1@0,2x1@0\.5', config '1x1@0,2x1@0\.6'; step_loss_decay"):
    checkpoint_lib.check_resume(saved, config, {}, "checkpoint 3")
  checkpoint_lib.check_resume(saved, {**config, "resume_allow_changes": "depth_schedule,step_loss_decay"}, {},
                              "checkpoint 3")
  # A checkpoint from before these keys existed resumes.
  checkpoint_lib.check_resume({"config": {"model": {"H_cycles": 2}}}, config, {}, "checkpoint 3")


# ---------------------------------------------------------------------------
# Training with a schedule: each stage compiled once, and a resume across a boundary exact.

SCHEDULE = "1x1@0,2x1@0.5"  # tiny_config's model is 2x1; the run has 6 steps, so the boundary is step 3


def count_traces(patch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
  """(H_cycles, L_cycles) of every trace of the train step: its Python body runs once per compilation."""
  seen = []
  original = steps.train_step

  def counting(state, carry, batch, **kwargs):
    seen.append((kwargs["model"].H_cycles, kwargs["model"].L_cycles))
    return original(state, carry, batch, **kwargs)
  patch.setattr(steps, "train_step", counting)
  return seen


@pytest.fixture(scope="module")
def curriculum_run(sudoku_data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("curriculum")
  with pytest.MonkeyPatch.context() as patch:
    seen = count_traces(patch)
    summary = train.train_and_evaluate(tiny_config(sudoku_data, depth_schedule=SCHEDULE), workdir)
  return workdir, summary, seen


def test_each_stage_is_compiled_once(curriculum_run):
  _, summary, seen = curriculum_run
  assert summary["end_step"] == 6
  assert seen == [(1, 1), (2, 1)]


def test_resume_across_a_stage_boundary_is_bit_identical(curriculum_run, sudoku_data, tmp_path, monkeypatch, capsys):
  reference_dir, summary, _ = curriculum_run
  traces = count_traces(monkeypatch)
  first = train.train_and_evaluate(tiny_config(sudoku_data, depth_schedule=SCHEDULE, max_steps=2), tmp_path)
  assert first["end_step"] == 2 and traces == [(1, 1)]
  second = train.train_and_evaluate(tiny_config(sudoku_data, depth_schedule=SCHEDULE), tmp_path)
  assert second["start_step"] == 2 and second["end_step"] == summary["end_step"]
  assert traces == [(1, 1), (1, 1), (2, 1)]  # the resumed run: the rest of stage 1, then stage 2
  out = capsys.readouterr().out
  assert "depth stage 1/2 at step 2: H_cycles=1, L_cycles=1" in out
  assert "depth stage 2/2 at step 3: H_cycles=2, L_cycles=1" in out
  assert_same_run(reference_dir, summary, tmp_path, second)


# ---------------------------------------------------------------------------
# Loss weights per supervision step.


def _batch_and_carry(config, steps_B):
  rng = np.random.default_rng(0)
  b = len(steps_B)
  batch = {"inputs": jnp.asarray(rng.integers(1, config.vocab_size, (b, config.seq_len)), jnp.int32),
           "labels": jnp.asarray(rng.integers(1, config.vocab_size, (b, config.seq_len)), jnp.int32),
           "puzzle_identifiers": jnp.asarray(rng.integers(0, config.num_puzzle_identifiers, (b,)), jnp.int32)}
  params = models.of(config).init_params(config, jax.random.PRNGKey(0))
  carry = act.reset_carry(config, params, act.initial_carry(config, batch), batch)
  # Rows part-way through their samples: the call is supervision step steps_B + 1.
  carry = carry.replace(steps=jnp.asarray(steps_B, jnp.int32), halted=jnp.zeros((b,), bool))
  rows = jnp.asarray(rng.normal(size=(b, config.puzzle_emb_ndim)), jnp.float32)
  return params, carry, rows


@pytest.mark.parametrize("arch", ["trm", "hrm"])  # hrm: with the q_continue term
def test_step_loss_decay_weighs_each_row_by_its_supervision_step(arch):
  config = model_config(arch, halt_max_steps=8, halt_exploration_prob=0.0, H_cycles=1, L_cycles=1)
  steps_B = [0, 1, 3, 6]
  params, carry, rows = _batch_and_carry(config, steps_B)

  @functools.partial(jax.jit, static_argnames="step_loss_decay")
  def loss(c, r, step_loss_decay=None):
    kw = {} if step_loss_decay is None else {"step_loss_decay": step_loss_decay}
    return losses.act_loss(config, params, r, c, train=True, **kw)

  plain, (_, plain_metrics, _) = loss(carry, rows)
  default, _ = loss(carry, rows, step_loss_decay=1.0)
  assert np.asarray(plain).tobytes() == np.asarray(default).tobytes()
  weighted, (_, metrics, _) = loss(carry, rows, step_loss_decay=0.7)
  per_row = [float(loss(jax.tree.map(lambda x, i=i: x[i:i + 1], carry), rows[i:i + 1])[0]) for i in range(4)]
  by_hand = sum(0.7 ** t * row for t, row in zip(steps_B, per_row))  # step t + 1 weighs 0.7^t
  np.testing.assert_allclose(float(weighted), by_hand, rtol=1e-5)
  np.testing.assert_allclose(float(plain), sum(per_row), rtol=1e-5)
  assert not np.isclose(float(weighted), float(plain), rtol=1e-3)
  for k in plain_metrics:  # the reported metrics stay unweighted
    np.testing.assert_array_equal(metrics[k], plain_metrics[k])
  if arch == "hrm":
    assert "q_continue_loss" in metrics
