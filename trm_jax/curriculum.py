"""Depth curriculum: a schedule of ``(H_cycles, L_cycles)`` over training (not in the original).

CGAR (arXiv 2511.08653) trains shallow recursions first and deepens them as
training goes on: ``config.depth_schedule = "1x2@0,2x4@0.3,3x6@0.6"`` trains
with ``H_cycles=1, L_cycles=2`` from the start, ``2x4`` from 30% of the
schedule's steps (``total_steps``, as the lr schedule; ``max_steps`` does not
move the boundaries) and ``3x6`` from 60%. The empty string (the default) is
off: every step uses ``config.model``'s cycles, as the original.

The stage of a step is a function of the step index alone, so a run resumed
from a checkpoint taken in any stage continues exactly as it would have. The
cycles change only what one supervision step computes, never a shape, so the
state and the ACT carry pass from one stage to the next unchanged; the
training loop compiles one step function per stage, when the stage starts.

Evaluation (in training and ``--mode=eval/predict/export``) always runs
``config.model``'s own cycles, the depth the run is meant to deliver, so that
its numbers compare across runs with and without a curriculum; a last stage
that differs from them is allowed (training shallower or deeper than the
evaluated depth), but is rarely what one wants.
"""

from __future__ import annotations

import dataclasses
import math
import re

from trm_jax import models
from trm_jax.errors import UserError

KEY = "config.depth_schedule"
_STAGE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*@\s*([0-9.eE+-]+)\s*$")


@dataclasses.dataclass(frozen=True)
class Stage:
  """``H_cycles`` x ``L_cycles`` from ``start_step`` (``fraction`` of the schedule's steps) on."""
  H_cycles: int
  L_cycles: int
  fraction: float
  start_step: int
  model: models.ModelConfig  # the run's model config with this stage's cycles


@dataclasses.dataclass(frozen=True)
class Schedule:
  stages: tuple[Stage, ...]

  def stage_index(self, step: int) -> int:
    """The stage in force for the update that follows ``step`` updates."""
    index = 0
    for i, stage in enumerate(self.stages):
      if stage.start_step <= step:
        index = i
    return index

  def stage(self, step: int) -> Stage:
    return self.stages[self.stage_index(step)]


def parse(text: str) -> list[tuple[int, int, float]]:
  """``"1x2@0,2x4@0.3"`` -> ``[(1, 2, 0.0), (2, 4, 0.3)]``, checked; a one-line ``UserError`` naming the key."""
  def fail(what: str):
    raise UserError(f"{KEY}={text!r}: {what}; expected stages 'HxL@fraction' separated by commas, the first at 0, "
                    f"fractions increasing in [0, 1), cycles >= 1 (e.g. '1x2@0,2x4@0.3,3x6@0.6')")
  stages = []
  for part in text.split(","):
    match = _STAGE.match(part)
    if not match:
      fail(f"cannot read stage {part.strip()!r}")
    h, l = int(match.group(1)), int(match.group(2))
    try:
      fraction = float(match.group(3))
    except ValueError:
      fail(f"cannot read the fraction of stage {part.strip()!r}")
    if h < 1 or l < 1:
      fail(f"stage {part.strip()!r} has cycles < 1")
    if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
      fail(f"stage {part.strip()!r} starts at {fraction:g}, outside [0, 1)")
    if stages and fraction <= stages[-1][2]:
      fail(f"stage {part.strip()!r} is out of order (it starts at or before the stage before it)")
    stages.append((h, l, fraction))
  if stages[0][2] != 0.0:
    fail(f"the first stage starts at {stages[0][2]:g}, not 0")
  return stages


def make_schedule(text: str, model: models.ModelConfig, total_steps: int) -> Schedule | None:
  """The schedule of ``config.depth_schedule`` (None when empty) for a run of ``total_steps`` steps.

  Raises a one-line ``UserError`` naming the key when it cannot work: a bad
  stage, or an architecture whose step has no cycles (``transformers_baseline``).
  """
  if not text.strip():
    return None
  parsed = parse(text)
  arch = models.of(model)
  if not arch.has_cycles:
    raise UserError(f"{KEY}={text!r}: model.arch={model.arch!r} has no cycles (its step ignores H_cycles and "
                    f"L_cycles); use an empty {KEY}")
  stages = []
  for h, l, fraction in parsed:
    try:
      stage_model = dataclasses.replace(model, H_cycles=h, L_cycles=l)
    except ValueError as e:
      raise UserError(f"{KEY}={text!r}: stage {h}x{l}: {str(e).replace('model config: ', 'model.')}") from None
    stages.append(Stage(h, l, fraction, math.floor(fraction * total_steps), stage_model))
  return Schedule(tuple(stages))


def check_step_loss_decay(decay: float) -> None:
  """``config.step_loss_decay`` must be a positive finite number (1.0: off)."""
  if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (math.isfinite(decay) and decay > 0):
    raise UserError(f"config.step_loss_decay={decay!r}: expected a positive number (1.0: every supervision step "
                    f"weighs the same, as the original; e.g. 0.7 weighs step t by 0.7^(t-1))")
