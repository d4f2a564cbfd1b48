"""What a task is to the rest of ``trm_jax``: a name, a drawing, evaluators, maybe a predictor.

A dataset records its task in ``dataset.json`` (``trm_jax.dataset_format``);
the code around the seam (evaluation, monitor, inference) asks the task's
object and never names a task itself. Evaluators are configured one by one
(``config.evaluators.<name> = {type: ..., its own keys}``) and made by their
``EvaluatorType``.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from trm_jax import errors


class EvaluatorConfigError(errors.UserError, ValueError):
  """An evaluator's entry of ``config.evaluators`` is not what its type takes."""


class Evaluator(Protocol):
  """Lives for a whole run; ``begin_eval`` starts each evaluation.

  Every evaluator gets, for every test batch, the host arrays of the whole
  global batch without its padding rows (``inputs``, ``labels``,
  ``puzzle_identifiers``, ``preds``, ``q_halt_logits``) and returns its
  metrics at the end. Every process sees every row, so every process computes
  the same result; only process 0 writes files.
  """

  def begin_eval(self) -> None:
    ...

  def update(self, set_name: str, batch: Mapping[str, np.ndarray]) -> None:
    ...

  def result(self, output_dir: pathlib.Path | None) -> dict[str, float]:
    ...

  def state(self) -> Any:
    """What must survive a resume (JSON-serialisable)."""
    ...

  def load_state(self, state: Any) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class EvaluatorType:
  """One kind of evaluator: ``make(settings, data_path, test_info)``; ``defaults`` lists every key it takes."""
  name: str
  make: Callable[[Mapping[str, Any], pathlib.Path, Any], Evaluator]
  defaults: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """A task: how to draw one sequence of its tokens, and what ``--mode=predict`` runs, if anything.

  ``draw(tokens[S], reference[S] or None) -> uint8 HxWx3``; with a reference
  (the target), wrong cells are marked. ``predictor``: the module (imported
  only when predicting) with ``prepare(config, input_path)`` (checks the
  config and reads the input before any model is loaded) and
  ``predict(run, eval_fn, params, table, prepared, output_path, *, step, started)``.
  """
  name: str
  draw: Callable[..., np.ndarray]
  predictor: str | None = None


# ---------------------------------------------------------------------------
# Drawing helpers shared by the tasks.


def square(tokens: np.ndarray) -> np.ndarray:
  """A sequence as a square grid (int64), or as one row when its length is not a square."""
  tokens = np.asarray(tokens).astype(np.int64)
  side = math.isqrt(tokens.size)
  if side * side != tokens.size:
    return tokens.reshape(1, tokens.size)
  return tokens.reshape(side, side)


def cells_to_image(rgb_HxWx3: np.ndarray, cell: int) -> np.ndarray:
  """Each cell a ``cell``-pixel square with a 1-pixel dark border."""
  img = np.repeat(np.repeat(rgb_HxWx3, cell, axis=0), cell, axis=1)
  img[::cell, :] = img[::cell, :] // 2
  img[:, ::cell] = img[:, ::cell] // 2
  return img


def mark_wrong(img: np.ndarray, grid: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
  """A red corner on every cell of ``grid`` that differs from a labelled cell of ``reference``."""
  if reference is None:
    return img
  reference = np.asarray(reference).reshape(grid.shape)
  wrong = (reference != grid) & (reference >= 0)
  cell = img.shape[0] // grid.shape[0]
  for r, c in zip(*np.nonzero(wrong)):
    img[r * cell:r * cell + 2, c * cell:c * cell + 2] = [255, 0, 0]
  return img
