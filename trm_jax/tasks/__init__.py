"""The registry of tasks and evaluators: everything a run does differently for ARC, Sudoku or mazes.

A dataset names its task in ``dataset.json`` (``trm_jax.dataset_format``):
``of_dataset`` gives its ``base.Task`` (drawing, ``--mode=predict``). A run's
evaluators are configured one by one, big_vision style::

  config.evaluators.arc = tasks.evaluator_config("arc")   # {type: "arc", pass_ks: ..., ...}
  --config.evaluators.arc.pass_ks=1,2                     # every key reachable from the command line

each entry's ``type`` (default: the entry's name) picking an
``EVALUATORS`` type that takes exactly the keys of its ``defaults``. Adding a
task is one module of this package and one line in ``_TASKS`` (and in
``_EVALUATORS`` when it brings one).
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, Mapping

import ml_collections

from trm_jax import dataset_format
from trm_jax.tasks import arc
from trm_jax.tasks import arc_eval
from trm_jax.tasks import base
from trm_jax.tasks import generic
from trm_jax.tasks import maze
from trm_jax.tasks import sudoku

Task = base.Task
EvaluatorConfigError = base.EvaluatorConfigError

_TASKS = (arc.TASK, sudoku.TASK, maze.TASK, generic.TASK)
_EVALUATORS = (arc_eval.EVALUATOR, maze.EVALUATOR)

TASKS: dict[str, base.Task] = {t.name: t for t in _TASKS}
EVALUATORS: dict[str, base.EvaluatorType] = {e.name: e for e in _EVALUATORS}
GENERIC = generic.TASK.name
# ARC datasets built before the task was recorded still name their builder.
_BUILDER_TASKS = {"data_prep.arc": arc.TASK.name}
_noted: set[str] = set()


def get(name: str) -> base.Task:
  """The task called ``name``; a one-line error listing the choices otherwise."""
  if name not in TASKS:
    raise dataset_format.DatasetFormatError(f"task {name!r}: expected one of {tuple(TASKS)}")
  return TASKS[name]


def of_dataset(info: dataset_format.SplitInfo) -> base.Task:
  """The task a split's ``dataset.json`` records.

  A dataset from before the task was recorded is the generic task, with a
  note (once per dataset) saying how to name its task; an ARC dataset of
  ``data_prep.arc`` is recognised by the builder it names. Never guessed from
  the shapes.
  """
  meta_path = info.path / dataset_format.METADATA_FILE
  if info.task is not None:
    if info.task not in TASKS:
      raise dataset_format.DatasetFormatError(
          f"{meta_path}: trm_jax.task={info.task!r}: expected one of {tuple(TASKS)}")
    return TASKS[info.task]
  if info.builder in _BUILDER_TASKS:
    return TASKS[_BUILDER_TASKS[info.builder]]
  if str(info.path) not in _noted:
    _noted.add(str(info.path))
    print(f"note: {meta_path} records no task (built before tasks were recorded): treated as the generic task; "
          f"add \"task\": one of {tuple(TASKS)} to its \"trm_jax\" block for the task's drawing and "
          "--mode=predict", file=sys.stderr, flush=True)
  return TASKS[GENERIC]


# ---------------------------------------------------------------------------
# Evaluators.


def evaluator_config(kind: str, **overrides: Any) -> ml_collections.ConfigDict:
  """An entry of ``config.evaluators``: ``type`` and every key of the type, at its defaults."""
  if kind not in EVALUATORS:
    raise EvaluatorConfigError(f"evaluator type {kind!r}: expected one of {tuple(EVALUATORS)}")
  return ml_collections.ConfigDict({"type": kind, **EVALUATORS[kind].defaults, **overrides})


def evaluator_settings(evaluators: Any) -> list[tuple[str, base.EvaluatorType, dict[str, Any]]]:
  """``(name, type, settings)`` of every entry of ``config.evaluators``, in name order; one-line errors."""
  if isinstance(evaluators, ml_collections.ConfigDict):
    evaluators = evaluators.to_dict()
  if not isinstance(evaluators, Mapping):
    raise EvaluatorConfigError(
        f"config.evaluators={evaluators!r}: expected a ConfigDict of named entries, e.g. "
        f"config.evaluators.arc = {{type: 'arc', ...}} (types: {tuple(EVALUATORS)})")
  out = []
  for name in sorted(evaluators):
    entry = evaluators[name]
    if not isinstance(entry, Mapping):
      raise EvaluatorConfigError(f"config.evaluators.{name}={entry!r}: expected an entry {{type: ..., its keys}}")
    kind = entry.get("type", name)
    if kind not in EVALUATORS:
      raise EvaluatorConfigError(f"config.evaluators.{name}.type={kind!r}: expected one of {tuple(EVALUATORS)}")
    et = EVALUATORS[kind]
    unknown = sorted(set(entry) - set(et.defaults) - {"type"})
    if unknown:
      raise EvaluatorConfigError(f"config.evaluators.{name}: unknown key(s) {unknown}; a {kind!r} evaluator takes "
                                 f"{sorted(et.defaults) or 'no key'} besides 'type'")
    out.append((name, et, {**et.defaults, **{k: v for k, v in entry.items() if k != "type"}}))
  return out


def make_evaluators(evaluators: Any, data_path: pathlib.Path, test_info: Any) -> list[base.Evaluator]:
  """The run's evaluators from ``config.evaluators`` (name order: the order of their saved states)."""
  out = []
  for name, et, settings in evaluator_settings(evaluators):
    try:
      out.append(et.make(settings, data_path, test_info))
    except (ValueError, OSError) as e:
      if isinstance(e, EvaluatorConfigError):
        raise
      raise EvaluatorConfigError(f"config.evaluators.{name} ({et.name!r}): {e}") from None
  return out
