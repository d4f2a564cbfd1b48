"""Orbax checkpoints: everything needed to continue a run, written atomically.

A checkpoint holds the ``TrainState`` (params, puzzle-embedding table,
optimiser states, EMA, step, rng), the ACT carry, the data iterator's state
and a ``meta`` JSON (the config, the loop position, the best metric so far).
Two managers: ``<workdir>/checkpoints`` keeps the latest ``keep`` and
``<workdir>/best`` the best by the configured metric (the original keeps only
the last, which can be worse by several points).

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a crash or a kill mid-write never leaves a half checkpoint as the
latest. Saves run in the background (the arrays are copied off the devices
first), and ``wait`` blocks until they are on disk.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "carry", "data", "meta", "evaluators")
# Config keys that change the shapes or the structure of the saved state: a
# checkpoint cannot continue under a config that differs in one of these.
STRUCTURAL_KEYS = (
    "model.arch", "model.hidden_size", "model.num_heads", "model.expansion", "model.L_layers", "model.H_layers",
    "model.mlp_t", "model.pos_encodings", "model.puzzle_emb_ndim", "model.puzzle_emb_len", "model.forward_dtype",
    "ema", "freeze_weights", "grad_clip_norm", "global_batch_size",
)


class IncompatibleCheckpointError(ValueError):
  """The checkpoint was written by a config this run cannot continue."""


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in config.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def check_compatible(saved_config: dict[str, Any], config: dict[str, Any], where: str) -> None:
  """Raises naming every structural key whose value differs."""
  saved, current = _flat(saved_config), _flat(config)
  diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
           for k in STRUCTURAL_KEYS if saved.get(k) != current.get(k)]
  if diffs:
    raise IncompatibleCheckpointError(
        f"{where} was written with an incompatible config ({'; '.join(diffs)}); "
        "use another --workdir or the same settings")


def _restore_args(abstract_tree: Any, relaxed_shape: bool = False) -> Any:
  def args(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is not None:
      return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype,
                                  strict=not relaxed_shape)
    return ocp.RestoreArgs()
  return jax.tree.map(args, abstract_tree)


class Checkpointer:
  """Latest-N and best checkpoints of one run directory."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, keep_best: bool = True,
               async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep}: expected >= 1")
    self.workdir = pathlib.Path(workdir).absolute()

    def manager(name, max_to_keep):
      # Each manager's barriers get their own names: the two save the same
      # step, and orbax names its barriers by step only, so with several
      # processes their background commits would wait on one barrier at once
      # ("Barrier _async_commit_complete.<step> is already ongoing") and
      # the processes would fall out of step.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"trm_{name}"))
      return ocp.CheckpointManager(self.workdir / name, options=options, item_names=ITEMS)
    self.latest = manager("checkpoints", keep)
    self.best = manager("best", 1) if keep_best else None
    # Which steps exist is tracked here, not read from the directory while
    # saves are in flight: with several processes, a decision to save (a
    # collective) must not depend on when each process lists the directory.
    self._latest_steps = set(self.latest.all_steps())
    self._best_step = self.best.latest_step() if self.best is not None else None

  def latest_step(self) -> int | None:
    return max(self._latest_steps) if self._latest_steps else None

  def best_step(self) -> int | None:
    return self._best_step

  def save(self, step: int, state: Any, carry: Any, data_state: dict[str, Any], meta: dict[str, Any], *,
           evaluators: Any = None, best: bool = False) -> None:
    """Saves to the latest-N set (and, with ``best``, as the new best).

    ``evaluators``: JSON state of the run's evaluators (pooled ARC votes).
    """
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), carry=ocp.args.PyTreeSave(carry),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta),
        evaluators=ocp.args.JsonSave({"states": evaluators}))
    if step not in self._latest_steps:
      self.latest.save(step, args=args)
      self._latest_steps.add(step)
    if best and self.best is not None and self._best_step != step:
      self.best.wait_until_finished()
      if self._best_step is not None:  # keep exactly one: this one
        self.best.delete(self._best_step)
      self.best.save(step, args=args)
      self._best_step = step

  def read_meta(self, step: int | None = None, *, from_best: bool = False) -> dict[str, Any] | None:
    manager = self.best if from_best else self.latest
    step = (self.best_step() if from_best else self.latest_step()) if step is None else step
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def read_evaluators(self, step: int, *, from_best: bool = False) -> Any:
    manager = self.best if from_best else self.latest
    return manager.restore(step, args=ocp.args.Composite(evaluators=ocp.args.JsonRestore())).evaluators["states"]

  def restore(self, abstract_state: Any, abstract_carry: Any, step: int | None = None, *,
              from_best: bool = False) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Restores onto the shardings held by the abstract trees (any mesh).

    The puzzle-embedding table may have a different number of padding rows
    on another mesh: it is read with relaxed shape checks (zero rows added or
    dropped at the end).
    """
    manager = self.best if from_best else self.latest
    step = (self.best_step() if from_best else self.latest_step()) if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    state_args = _restore_args(abstract_state)
    state_args = state_args.replace(puzzle_emb=_restore_args(abstract_state.puzzle_emb, relaxed_shape=True))
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(abstract_state, restore_args=state_args),
        carry=ocp.args.PyTreeRestore(abstract_carry, restore_args=_restore_args(abstract_carry)),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return restored.state, restored.carry, restored.data, restored.meta

  def wait(self) -> None:
    self.latest.wait_until_finished()
    if self.best is not None:
      self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    if self.best is not None:
      self.best.close()


def config_to_dict(config: Any) -> dict[str, Any]:
  """A JSON round trip of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
