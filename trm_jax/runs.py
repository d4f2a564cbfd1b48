"""A run before its loop: the config checked against the data and the devices, and the state's layout.

``setup`` checks everything a user can get wrong (the dataset, the batch size
against the devices, the schedule, the model keys) before anything is
compiled, and raises a ``UserError`` naming the problem. ``make_layout`` then
gives the abstract state and carry with their shardings, and jitted functions
that create them sharded (``eval_shape`` -> shardings -> jitted init). The
training loop (``trm_jax.train``) and the inference entry points
(``trm_jax.inference``) both start here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from trm_jax import act
from trm_jax import cpu_runtime
from trm_jax import curriculum
from trm_jax import data as data_lib
from trm_jax import dataset_format
from trm_jax import datasets
from trm_jax import init_weights as init_weights_lib
from trm_jax import models
from trm_jax import optim
from trm_jax import sharding
from trm_jax import state as state_lib
from trm_jax import tasks
from trm_jax import test_time
from trm_jax import workdir as workdir_lib
from trm_jax.errors import UserError


def is_out_of_memory(error: BaseException) -> bool:
  """Whether a JAX runtime error is the device running out of memory."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory_error(config: ml_collections.ConfigDict, num_devices: int) -> UserError:
  """What to change when the step does not fit: the batch, remat or the kernels."""
  batch = config.global_batch_size
  return UserError(
      f"out of device memory at global_batch_size={batch} ({batch / num_devices:g} per device on {num_devices} "
      f"device(s)) with model.kernels={config.model.kernels!r} and model.remat={config.model.remat!r}. "
      f"Lower --config.global_batch_size, or save memory with --config.model.remat=network or "
      f"--config.model.kernels=pallas; `python -m trm_jax.bench --config=<this config> --find_max_batch` "
      f"finds the largest batch that fits. The latest checkpoint is intact.")


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """Starts JAX's distributed runtime for a multi-host run.

  From the flags when they are given (all three), else from the cluster
  environment when it describes several processes (``JAX_COORDINATOR_ADDRESS``,
  SLURM, Open MPI: ``jax.distributed.initialize()`` reads them); a single
  process needs nothing.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise UserError("multi-host: pass all of --coordinator_address, --num_processes and --process_id "
                      "(or none of them and let the cluster environment provide them)")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return
  tasks = int(os.environ.get("SLURM_NTASKS", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
  if "JAX_COORDINATOR_ADDRESS" in os.environ or tasks > 1:
    jax.distributed.initialize()


# ---------------------------------------------------------------------------
# Setup: everything that can fail because of the user, before any compilation.


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  data_path: pathlib.Path  # the first of train_dirs (ARC evaluation and predict read its identifiers)
  train_info: dataset_format.SplitInfo | None
  test_info: dataset_format.SplitInfo | None
  task: tasks.Task  # what dataset.json records (trm_jax.tasks)
  model: models.ModelConfig
  mesh: jax.sharding.Mesh
  optimizers: optim.Optimizers
  total_steps: int
  total_iters: int
  eval_batch_size: int
  train_dirs: tuple[pathlib.Path, ...] = ()  # config.data_path: one directory or several trained as one
  test_dirs: tuple[pathlib.Path, ...] = ()  # config.test_data_path, else train_dirs
  # config.depth_schedule's stages (None: config.model's cycles at every step).
  depth_schedule: curriculum.Schedule | None = None
  eval_options: test_time.EvalOptions = test_time.EvalOptions()


def model_config(config: ml_collections.ConfigDict, metadata: dataset_format.DatasetMetadata) -> models.ModelConfig:
  """The model config: ``config.model`` plus the dataset's sizes."""
  fields = dict(config.model.to_dict())
  fields.update(seq_len=metadata.seq_len, vocab_size=metadata.vocab_size,
                num_puzzle_identifiers=metadata.num_puzzle_identifiers)
  try:
    return models.config_from_dict(fields)
  except ValueError as e:
    raise UserError(str(e).replace("model config: ", "config.model.")) from None


def _check_schedule(config: ml_collections.ConfigDict) -> None:
  if config.epochs < 1 or config.eval_interval < 1:
    raise UserError(f"epochs={config.epochs} and eval_interval={config.eval_interval} must be >= 1")
  if config.epochs % config.eval_interval:
    raise UserError(f"eval_interval={config.eval_interval} does not divide epochs={config.epochs}")
  if config.global_batch_size < 1:
    raise UserError(f"global_batch_size={config.global_batch_size} must be >= 1")
  if config.best_mode not in ("max", "min"):
    raise UserError(f"best_mode={config.best_mode!r}: expected 'max' or 'min'")
  if config.log_every_steps < 1:
    raise UserError(f"log_every_steps={config.log_every_steps} must be >= 1")


def _load_split(paths: list[pathlib.Path], split: str) -> dataset_format.SplitInfo:
  try:
    return data_lib.load_dataset_info(paths, split)
  except dataset_format.DatasetFormatError as e:
    where = f"dataset {paths[0]}: " if len(paths) == 1 else ""
    raise UserError(f"{where}{e}") from None


def _existing(dirs: list[pathlib.Path], key: str) -> list[pathlib.Path]:
  for d in dirs:
    if not d.is_dir():
      raise UserError(f"{key} {str(d)!r} does not exist; build it with data_prep (see README)"
                      + (" or set config.data_build" if key == "data_path" else ""))
  return dirs


def setup(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, need_train: bool = True,
          need_test: bool = True) -> Run:
  """Validates the config against the data and the devices; builds nothing on device."""
  _check_schedule(config)
  workdir = workdir_lib.check(workdir, create=False)
  try:
    train_dirs = _existing(datasets.ensure_dataset(config), "data_path")
  except ValueError as e:
    raise UserError(str(e)) from None
  separate_test = bool(str(config.test_data_path).strip())
  test_dirs = (_existing(datasets.data_dirs(config.test_data_path, "test_data_path"), "test_data_path")
               if separate_test else train_dirs)
  data_path = train_dirs[0]
  # The model's sizes come from the train split; a separate test set needs it even to evaluate.
  train_info = _load_split(train_dirs, "train") if need_train or separate_test else None
  test_info = _load_split(test_dirs, "test") if need_test else None
  metadata = (train_info or test_info).metadata
  try:
    task = tasks.of_dataset(train_info or test_info)
  except dataset_format.DatasetFormatError as e:
    raise UserError(f"dataset {data_path}: {e}") from None
  if train_info is not None and test_info is not None:
    a, b = train_info.metadata, test_info.metadata
    where = ", ".join(map(str, train_dirs)) + ("" if not separate_test else " and " + ", ".join(map(str, test_dirs)))
    if (a.seq_len, a.vocab_size) != (b.seq_len, b.vocab_size):
      raise UserError(f"dataset {where}: train and test disagree on seq_len/vocab_size")
    if b.num_puzzle_identifiers > a.num_puzzle_identifiers or (
        not separate_test and a.num_puzzle_identifiers != b.num_puzzle_identifiers):
      raise UserError(f"dataset {where}: the test split has {b.num_puzzle_identifiers} puzzle identifiers, "
                      f"the train split {a.num_puzzle_identifiers}")
  if len(test_dirs) > 1 and list(config.evaluators.keys()):
    raise UserError(f"evaluators {sorted(config.evaluators.keys())} read one test dataset's files, but the test data has "
                    f"{len(test_dirs)} directories: evaluate each with --mode=eval and its own "
                    "--config.test_data_path")
  model = model_config(config, metadata)
  eval_options = test_time.options_from_config(config, model)
  # After the checks a mistake can fail (they need no backend), before the
  # mesh starts jax's backends: the CPU settings must precede that.
  cpu_runtime.configure(config.cpu_keep_step_memory)
  try:
    mesh = sharding.make_mesh(sharding.MeshShape(**config.mesh.to_dict()))
    sharding.check_global_batch_size(config.global_batch_size, mesh)
    eval_batch_size = config.eval_batch_size or config.global_batch_size
    sharding.check_global_batch_size(eval_batch_size, mesh)
  except ValueError as e:
    raise UserError(str(e)) from None
  if config.param_sharding not in sharding.PARAM_SHARDINGS:
    raise UserError(f"param_sharding={config.param_sharding!r}: expected one of {sharding.PARAM_SHARDINGS}")
  if train_info is not None:
    total_steps = optim.total_train_steps(config.epochs, train_info.metadata.total_groups,
                                          train_info.metadata.mean_puzzle_examples, config.global_batch_size)
    if total_steps < 1:
      raise UserError(f"the schedule has no step: epochs={config.epochs} x {train_info.metadata.total_groups} "
                      f"groups x {train_info.metadata.mean_puzzle_examples:.3g} examples < "
                      f"global_batch_size={config.global_batch_size}")
  else:
    total_steps = 1
  depth_schedule = curriculum.make_schedule(config.depth_schedule, model, total_steps)
  curriculum.check_step_loss_decay(config.step_loss_decay)
  optimizers = optim.make_optimizers(
      lr=config.lr, weight_decay=config.weight_decay, puzzle_emb_lr=config.puzzle_emb_lr,
      puzzle_emb_weight_decay=config.puzzle_emb_weight_decay, beta1=config.beta1, beta2=config.beta2,
      warmup_steps=config.lr_warmup_steps, total_steps=total_steps, lr_min_ratio=config.lr_min_ratio,
      grad_clip_norm=config.grad_clip_norm or None, freeze_weights=config.freeze_weights,
      trainable_mask=state_lib.trainable_mask)
  return Run(config=config, workdir=pathlib.Path(workdir), data_path=data_path, train_info=train_info,
             test_info=test_info, task=task, model=model, mesh=mesh, optimizers=optimizers, total_steps=total_steps,
             total_iters=config.epochs // config.eval_interval, eval_batch_size=eval_batch_size,
             train_dirs=tuple(train_dirs), test_dirs=tuple(test_dirs), depth_schedule=depth_schedule,
             eval_options=eval_options)


# ---------------------------------------------------------------------------
# State: created sharded, or restored onto this mesh.


def _zeros_batch(model: models.ModelConfig, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {"inputs": jnp.zeros((batch_size, model.seq_len), jnp.int32),
          "labels": jnp.zeros((batch_size, model.seq_len), jnp.int32),
          "puzzle_identifiers": jnp.zeros((batch_size,), jnp.int32)}


@dataclasses.dataclass
class Layout:
  """Abstract trees and shardings of the state and the carry on a mesh."""
  state_shardings: Any
  carry_shardings: Any
  abstract_state: Any
  abstract_carry: Any
  create_state: Any  # () -> TrainState, jitted with out_shardings
  create_carry: Any  # () -> Carry, jitted with out_shardings


def make_layout(run: Run) -> Layout:
  model, mesh, config = run.model, run.mesh, run.config
  rows = sharding.padded_table_rows(model.num_puzzle_identifiers, mesh)

  def create_state():
    return state_lib.create_train_state(model, run.optimizers, config.seed, ema=config.ema, puzzle_emb_rows=rows)

  def create_carry():
    return act.initial_carry(model, _zeros_batch(model, config.global_batch_size))

  abstract_state = jax.eval_shape(create_state)
  abstract_carry = jax.eval_shape(create_carry)
  state_sh = sharding.state_shardings(abstract_state, mesh, config.param_sharding)
  carry_sh = sharding.carry_shardings(abstract_carry, mesh)

  def with_sharding(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

  return Layout(state_sh, carry_sh, with_sharding(abstract_state, state_sh),
                with_sharding(abstract_carry, carry_sh),
                jax.jit(create_state, out_shardings=state_sh), jax.jit(create_carry, out_shardings=carry_sh))


def load_initial_weights(run: Run, layout: Layout, state: state_lib.TrainState) -> state_lib.TrainState:
  """``config.init_weights``: original-named weights (.npz or the original's torch.save file) replace the initial ones.

  A puzzle table of another row count is reset as the original does (see ``init_weights``).
  """
  try:
    params, table, notices = init_weights_lib.load(run.model, run.config.init_weights)
  except ValueError as e:
    raise UserError(str(e)) from None
  if jax.process_index() == 0:
    for notice in notices:
      print(f"note: {notice}", flush=True)
  table = sharding.pad_table(table, state.puzzle_emb.shape[0])
  params = jax.device_put(params, layout.state_shardings.params)
  puzzle_emb = jax.device_put(table, layout.state_shardings.puzzle_emb)
  opt_state = jax.jit(run.optimizers.dense.init, out_shardings=layout.state_shardings.opt_state)(params)
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  return state.replace(params=params, puzzle_emb=puzzle_emb, opt_state=opt_state, ema_params=ema)


def dataset_shapes(run: Run) -> dict[str, int]:
  """The dataset's sizes a checkpoint records (a resume on other sizes is refused)."""
  return {"seq_len": run.model.seq_len, "vocab_size": run.model.vocab_size,
          "num_puzzle_identifiers": run.model.num_puzzle_identifiers}
