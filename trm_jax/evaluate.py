"""Task evaluators run beside the per-set metrics of SPEC §5 (SPEC §9).

Every evaluator gets, for every test batch, the host arrays of the whole
global batch without its padding rows (``inputs``, ``labels``,
``puzzle_identifiers``, ``preds``, ``q_halt_logits``) and returns its metrics
at the end. Every process sees every row, so every process computes the same
result; only process 0 writes files.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Protocol

import jax
import numpy as np

EVALUATORS = ("arc", "maze")


class Evaluator(Protocol):
  """Lives for a whole run; ``begin_eval`` starts each evaluation."""

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


class ARCEvaluator:
  """Crop, undo the augmentation, vote, pass@K and ``submission.json`` (``trm_jax.arc_eval``).

  With ``aggregated_voting`` (the original's default) the votes of every
  evaluation of the run are pooled: later evaluations also count the
  predictions of earlier ones. The pool is saved in checkpoints.
  """

  def __init__(self, data_path: pathlib.Path, pass_ks, submission_k: int, aggregated_voting: bool = True):
    from trm_jax import arc_eval  # pylint: disable=g-import-not-at-top
    self._ev = arc_eval.ARCEvaluator(data_path, pass_ks=tuple(pass_ks), submission_k=submission_k,
                                     aggregated_voting=aggregated_voting)

  def begin_eval(self) -> None:
    self._ev.begin_eval()

  def update(self, set_name: str, batch: Mapping[str, np.ndarray]) -> None:
    del set_name
    self._ev.update(batch["puzzle_identifiers"], batch["inputs"], batch["preds"], batch["q_halt_logits"])

  def result(self, output_dir: pathlib.Path | None) -> dict[str, float]:
    write = output_dir if jax.process_index() == 0 else None
    return dict(self._ev.result(write))

  def state(self) -> Any:
    return self._ev.state() if self._ev.aggregated_voting else None

  def load_state(self, state: Any) -> None:
    self._ev.reset()
    if state:
      self._ev.merge([state])


class MazeEvaluator:
  """Share of predicted paths that are valid and shortest (many shortest paths tie)."""

  def __init__(self, seq_len: int):
    self.grid_size = math.isqrt(seq_len)
    if self.grid_size ** 2 != seq_len:
      raise ValueError(f"evaluators: 'maze' needs square grids, but seq_len={seq_len}")
    self._counts: dict[str, list[int]] = {}

  def begin_eval(self) -> None:
    self._counts = {}

  def state(self) -> Any:
    return None

  def load_state(self, state: Any) -> None:
    del state

  def update(self, set_name: str, batch: Mapping[str, np.ndarray]) -> None:
    from data_prep import maze  # pylint: disable=g-import-not-at-top
    ok = maze.valid_shortest_path(batch["inputs"], batch["preds"], self.grid_size)
    counts = self._counts.setdefault(set_name, [0, 0])
    counts[0] += int(np.sum(ok))
    counts[1] += int(ok.shape[0])

  def result(self, output_dir: pathlib.Path | None) -> dict[str, float]:
    del output_dir
    return {f"{s}/valid_shortest_accuracy": c / max(n, 1) for s, (c, n) in self._counts.items()}


def parse_evaluators(spec: str) -> list[str]:
  names = [n.strip() for n in spec.split(",") if n.strip()]
  unknown = [n for n in names if n not in EVALUATORS]
  if unknown:
    raise ValueError(f"evaluators: unknown {unknown}; expected a comma-separated subset of {EVALUATORS}")
  return names


def make_evaluators(config: Any, data_path: pathlib.Path, test_info: Any) -> list[Evaluator]:
  out: list[Evaluator] = []
  for name in parse_evaluators(config.evaluators):
    if name == "arc":
      out.append(ARCEvaluator(data_path, config.arc_pass_ks, config.arc_submission_k,
                              config.arc_aggregated_voting))
    elif name == "maze":
      out.append(MazeEvaluator(test_info.metadata.seq_len))
  return out
