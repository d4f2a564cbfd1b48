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
first), and ``wait`` blocks until they are on disk. Each step carries the
checksums of its files (``trm_jax.integrity``); a damaged step is never
restored: the newest intact one is. A save that fails raises
``CheckpointSaveError`` at once (or at the next ``check``/``save``/``wait``
for its background part), naming the directory and the cause.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from trm_jax import errors
from trm_jax import integrity

ITEMS = ("state", "carry", "data", "meta", "evaluators")
# Config keys that change the shapes or the structure of the saved state: a
# checkpoint cannot continue under a config that differs in one of these.
STRUCTURAL_KEYS = (
    "model.arch", "model.hidden_size", "model.num_heads", "model.expansion", "model.L_layers", "model.H_layers",
    "model.mlp_t", "model.pos_encodings", "model.puzzle_emb_ndim", "model.puzzle_emb_len", "model.forward_dtype",
    "ema", "freeze_weights", "grad_clip_norm", "global_batch_size",
)


class IncompatibleCheckpointError(errors.UserError, ValueError):
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


# Model keys that do not change what the model computes, only how: free to
# change on resume (e.g. Pallas kernels on the GPU a run moves to, with tile
# sizes tuned for it: every key under model.kernel_params).
IMPLEMENTATION_KEYS = ("model.kernels", "model.remat")
IMPLEMENTATION_PREFIXES = ("model.kernel_params.",)


def is_implementation_key(key: str) -> bool:
  return key in IMPLEMENTATION_KEYS or key.startswith(IMPLEMENTATION_PREFIXES)


# Training keys outside ``model`` that change what the steps compute: checked on
# resume as the model keys are (a resume with another curriculum is not exact).
TRAINING_KEYS = ("depth_schedule", "step_loss_decay")


def check_resume(saved_meta: dict[str, Any], config: dict[str, Any], dataset: dict[str, int], where: str) -> None:
  """Raises unless a training run may continue from a checkpoint with this config and dataset.

  The dataset must make the same shapes (a different ``num_puzzle_identifiers``
  would otherwise be padded or cut silently), and no model setting may
  differ (``H_cycles``, ``halt_max_steps``, ...), nor a ``TRAINING_KEYS`` one, unless it is named in
  ``config.resume_allow_changes``: continuing a run with another recursion
  depth is almost always a mistake, so it is refused rather than warned about.
  """
  trained_on = saved_meta.get("dataset")
  if trained_on and trained_on != dataset:
    diffs = ", ".join(f"{k} {trained_on.get(k)} -> {dataset.get(k)}" for k in dataset if trained_on.get(k) != dataset[k])
    data_path = saved_meta.get("config", {}).get("data_path")
    raise IncompatibleCheckpointError(
        f"{where} was trained on another dataset ({diffs}; it used data_path {data_path!r}): resume with "
        f"--config.data_path={data_path}, or start a new run in another --workdir")
  saved, current = _flat(saved_meta.get("config", {})), _flat(config)
  allowed = {k.strip() for k in str(current.get("resume_allow_changes") or "").split(",") if k.strip()}
  allowed |= {k.removeprefix("model.") for k in allowed}
  changed = [k for k in current if (k.startswith("model.") or k in TRAINING_KEYS) and k in saved
             and k not in STRUCTURAL_KEYS
             and not is_implementation_key(k) and saved[k] != current[k]
             and k not in allowed and k.removeprefix("model.") not in allowed]
  if changed:
    listed = "; ".join(f"{k}: checkpoint {saved[k]!r}, config {current[k]!r}" for k in changed)
    raise IncompatibleCheckpointError(
        f"{where} was trained with other model settings ({listed}); resume with the run's values, or "
        f"continue with the new ones on purpose with --config.resume_allow_changes={','.join(changed)}")


def _restore_args(abstract_tree: Any, relaxed_shape: bool = False) -> Any:
  def args(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and getattr(leaf, "sharding", None) is not None:
      return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype,
                                  strict=not relaxed_shape)
    return ocp.RestoreArgs()
  return jax.tree.map(args, abstract_tree)


class CheckpointSaveError(errors.UserError, OSError):
  """A checkpoint could not be written (an unwritable directory, a full disk)."""


def _cause(error: BaseException) -> str:
  """The root cause of a failed save in a few words (an OS error's text, else the first line)."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror + (f" ({seen.filename})" if seen.filename else "")
    match = re.search(r"os_error_code='?(\d+)", str(seen))
    if match:
      return os.strerror(int(match.group(1)))
    seen = seen.__cause__ or seen.__context__
  return (str(error).strip().splitlines() or [error.__class__.__name__])[0][:300]


def _broadcast_steps(steps: list[int]) -> list[int]:
  """Process 0's list of steps, on every process (at most 255 of them)."""
  if jax.process_count() == 1:
    return steps
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  buf = np.full((256,), -1, np.int64)
  buf[0] = len(steps[:255])
  buf[1:1 + len(steps[:255])] = steps[:255]
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return [int(s) for s in buf[1:1 + int(buf[0])]]


def _step_dirs(directory: pathlib.Path) -> list[int]:
  if not directory.is_dir():
    return []
  return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()), reverse=True)


class Checkpointer:
  """Latest-N and best checkpoints of one run directory.

  At start, the newest steps are checked (``trm_jax.integrity``) until an
  intact one is found: damaged ones are left out of ``latest_step`` /
  ``best_step`` and listed in ``damaged`` (one line each); with ``repair`` (a
  training run) they are moved to ``<workdir>/damaged/`` so that the run can
  write those steps again, and best checkpoints superseded by a newer intact
  one (left by a kill during the switch) are deleted. Process 0 checks and the
  others take its answer, so every process restores the same step.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, keep_best: bool = True,
               async_save: bool = True, repair: bool = False, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep}: expected >= 1")
    self.workdir = pathlib.Path(workdir).absolute()
    self.damaged: list[str] = []
    self._async = async_save
    self._pending: dict[str, int] = {}
    self._failed = False
    self._previous_best: int | None = None
    names = ("checkpoints", "best") if keep_best else ("checkpoints",)
    for name in names:
      if (self.workdir / name).exists() and not (self.workdir / name).is_dir():
        raise CheckpointSaveError(f"cannot save checkpoints in {self.workdir / name}: it is a file")
    bad = {name: _broadcast_steps(self._check(name, repair) if jax.process_index() == 0 else [])
           for name in names}

    def manager(name, max_to_keep):
      # Each manager's barriers get their own names: the two save the same
      # step, and orbax names its barriers by step only, so with several
      # processes their background commits would wait on one barrier at once
      # ("Barrier _async_commit_complete.<step> is already ongoing") and
      # the processes would fall out of step.
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, create=not read_only,
          enable_async_checkpointing=async_save, cleanup_tmp_directories=repair,
          async_options=ocp.AsyncOptions(post_finalization_callback=functools.partial(self._seal, name))
          if async_save else None,
          multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"trm_{name}"))
      path = self.workdir / name
      try:
        return ocp.CheckpointManager(path, options=options, item_names=ITEMS)
      except OSError as e:
        raise CheckpointSaveError(f"cannot save checkpoints in {path}: {_cause(e)}") from None
    self.latest = manager("checkpoints", keep)
    # No max_to_keep: a new best is committed before the old one is deleted,
    # so a kill in between leaves one of them (see save).
    self.best = manager("best", None) if keep_best else None
    # Which steps exist is tracked here, not read from the directory while
    # saves are in flight: with several processes, a decision to save (a
    # collective) must not depend on when each process lists the directory.
    self._latest_steps = set(self.latest.all_steps()) - set(bad["checkpoints"])
    best_steps = sorted(set(self.best.all_steps()) - set(bad["best"])) if self.best is not None else []
    self._best_step = best_steps[-1] if best_steps else None
    # Only a training run (repair) removes older best steps: eval, predict and export only read.
    self._superseded_best = best_steps[:-1] if repair else []

  def _check(self, name: str, repair: bool) -> list[int]:
    """Process 0: the damaged steps of ``<workdir>/<name>`` newer than its newest intact one."""
    directory = self.workdir / name
    bad = []
    for step in _step_dirs(directory):
      problem = integrity.verify(directory / str(step), ITEMS)
      if problem is None:
        break
      bad.append(step)
      line = f"checkpoint {directory / str(step)} is damaged: {problem}"
      if repair:
        dest = self.workdir / "damaged" / f"{name}_{step}"
        n = 1
        while dest.exists():
          dest, n = self.workdir / "damaged" / f"{name}_{step}.{n}", n + 1
        dest.parent.mkdir(exist_ok=True)
        (directory / str(step)).rename(dest)
        line += f"; moved to {dest}"
      self.damaged.append(line)
    return bad

  def _seal(self, name: str) -> None:
    """Orbax's post-finalization callback (process 0): the manifest goes in before the rename."""
    step = self._pending.get(name)
    if step is None:
      return
    directory = self.workdir / name
    tmp = [p for p in directory.glob(f"{step}.orbax-checkpoint-tmp*") if p.is_dir()]
    integrity.write_manifest(tmp[0] if len(tmp) == 1 else directory / str(step), step)

  def latest_step(self) -> int | None:
    return max(self._latest_steps) if self._latest_steps else None

  def best_step(self) -> int | None:
    return self._best_step

  def _save(self, manager: ocp.CheckpointManager, name: str, step: int, args: Any) -> None:
    try:
      manager.wait_until_finished()  # a failed background save surfaces here, naming its step
      self._pending[name] = step
      manager.save(step, args=args)
      if not self._async and jax.process_index() == 0:
        integrity.write_manifest(self.workdir / name / str(step), step)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._save_error(name, e) from None

  def _save_error(self, name: str, error: BaseException) -> CheckpointSaveError:
    """Stops the run: the failed step is forgotten and its temporary directory removed."""
    self._failed = True
    step = self._pending.get(name)
    directory = self.workdir / name
    if step is not None and name == "checkpoints":
      self._latest_steps.discard(step)
    self._remove_failed()
    kept = self.latest_step() if name == "checkpoints" else self._previous_best
    return CheckpointSaveError(
        f"could not save checkpoint {step} in {directory}: {_cause(error)}; training stopped, "
        f"the last good checkpoint is " + (f"step {kept}" if kept is not None else "none (nothing was saved)"))

  def check(self) -> None:
    """Raises ``CheckpointSaveError`` if a background save has failed (does not block; one process)."""
    if jax.process_count() > 1:
      return  # the failure surfaces at the next save, on every process together
    for name, manager in (("checkpoints", self.latest), ("best", self.best)):
      if manager is not None and name in self._pending and not manager.is_saving_in_progress():
        try:
          manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-exception-caught
          raise self._save_error(name, e) from None

  def save(self, step: int, state: Any, carry: Any, data_state: dict[str, Any], meta: dict[str, Any], *,
           evaluators: Any = None, best: bool = False) -> None:
    """Saves to the latest-N set (and, with ``best``, as the new best).

    ``evaluators``: JSON state of the run's evaluators (pooled ARC votes).
    Raises ``CheckpointSaveError`` when this save, or the background part of
    the previous one, failed.
    """
    args = ocp.args.Composite(
        state=ocp.args.PyTreeSave(state), carry=ocp.args.PyTreeSave(carry),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta),
        evaluators=ocp.args.JsonSave({"states": evaluators}))
    if step not in self._latest_steps:
      self._save(self.latest, "checkpoints", step, args)
      self._latest_steps.add(step)
    if best and self.best is not None and self._best_step != step:
      self._previous_best = self._best_step
      self._save(self.best, "best", step, args)  # waits until the previous best is committed ...
      self._delete_superseded_best()  # ... so older ones can go: never an empty best/
      if self._best_step is not None:
        self._superseded_best.append(self._best_step)
      self._best_step = step

  def _delete_superseded_best(self) -> None:
    while self._superseded_best:
      self.best.delete(self._superseded_best.pop())

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
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(abstract_state, restore_args=state_args),
          carry=ocp.args.PyTreeRestore(abstract_carry, restore_args=_restore_args(abstract_carry)),
          data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except ValueError as e:
      if "shape" not in str(e).lower():
        raise
      detail = (str(e).strip().splitlines() or [""])[0][:200]
      raise IncompatibleCheckpointError(
          f"checkpoint {step} in {manager.directory} holds arrays of other shapes than this config and dataset "
          f"make ({detail}): use the run's dataset and model settings, or another --workdir") from None
    return restored.state, restored.carry, restored.data, restored.meta

  def wait(self) -> None:
    """Blocks until every save is on disk; raises ``CheckpointSaveError`` if one failed."""
    for name, manager in (("checkpoints", self.latest), ("best", self.best)):
      if manager is not None:
        try:
          manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-exception-caught
          raise self._save_error(name, e) from None
    if self.best is not None:
      self._delete_superseded_best()

  def close(self) -> None:
    """Waits for the saves and releases the managers (after a failed save: without raising again)."""
    if not self._failed:
      self.wait()
    for manager in (self.latest, self.best):
      if manager is not None:
        try:
          manager.close()
        except Exception:  # pylint: disable=broad-exception-caught
          if not self._failed:
            raise
    if self._failed:
      self._remove_failed()

  def _remove_failed(self) -> None:
    """Process 0: the temporary directories of failed saves (writers still running may add to one
    after a first removal; what is left then goes when the run restarts: ``repair``)."""
    if jax.process_index() != 0:
      return
    for name, step in self._pending.items():
      for tmp in (self.workdir / name).glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def config_to_dict(config: Any) -> dict[str, Any]:
  """A JSON round trip of an ml_collections config (tuples become lists)."""
  return json.loads(config.to_json_best_effort())
