"""The device mesh and how every array of a run is laid out on it.

Mesh axes: ``data`` (batch), ``fsdp`` (batch, and optionally the dense
parameters and optimiser moments), ``model`` (optionally the hidden width of
the projections: qkv / gate_up by output, o / down by input). The batch and
the ACT carry are split over ``data`` x ``fsdp``; the puzzle-embedding table
is split by rows over every device (its rows are padded to a multiple of the
device count; the padding rows are zeros that no id ever reaches). Dense
parameters are replicated unless ``param_sharding`` says otherwise: TRM has
about 7M of them, so replication is usually fastest.

All jit calls use explicit ``NamedSharding``s and the mesh is built with
``Auto`` axis types (GSPMD propagation): ``jax.make_mesh`` defaults to
explicit axes from jax 0.7 on, which this code does not use.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")
PARAM_SHARDINGS = ("replicated", "fsdp", "fsdp_model")
# Weights split by their output features under the ``model`` axis ...
_COLUMN_PARALLEL = ("qkv_proj", "gate_up_proj")
# ... and these by their input features.
_ROW_PARALLEL = ("o_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int = -1  # -1: every device not used by the other axes
  fsdp: int = 1
  model: int = 1


def resolve_mesh_shape(shape: MeshShape, num_devices: int) -> tuple[int, int, int]:
  sizes = [shape.data, shape.fsdp, shape.model]
  for name, size in zip(AXES, sizes):
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{name}={size}: expected a positive size or -1 (fill)")
  if sizes.count(-1) > 1:
    raise ValueError("mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices do not divide by mesh.fsdp * mesh.model = {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: data x fsdp x model = {' x '.join(map(str, sizes))} = {math.prod(sizes)}, "
                     f"but there are {num_devices} devices")
  return tuple(sizes)


def make_mesh(shape: MeshShape = MeshShape(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp, model)`` mesh with Auto axis types over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(shape, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(sizes, AXES, axis_types=axis_types)
  return Mesh(np.asarray(devices).reshape(sizes), AXES, axis_types=axis_types)


def batch_size_per_shard(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_global_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  shards = batch_size_per_shard(mesh)
  if global_batch_size % shards:
    raise ValueError(f"global_batch_size={global_batch_size} does not divide over the mesh's "
                     f"data x fsdp = {shards} batch shards")
  if global_batch_size % jax.process_count():
    raise ValueError(f"global_batch_size={global_batch_size} does not divide over "
                     f"{jax.process_count()} processes")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis over data x fsdp; everything else whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def table_sharding(mesh: Mesh) -> NamedSharding:
  """The puzzle-embedding table: rows over every device."""
  return NamedSharding(mesh, P(AXES, None))


def padded_table_rows(num_rows: int, mesh: Mesh) -> int:
  """Rows of the stored table: ``num_rows`` rounded up to a multiple of the device count."""
  return -(-num_rows // mesh.size) * mesh.size


def _leaf_name(path) -> str | None:
  keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(keys[-1]) if keys else None


def dense_leaf_spec(path, shape: tuple[int, ...], mesh: Mesh, param_sharding: str) -> P:
  """PartitionSpec of a dense parameter or of a leaf shaped like one (EMA, moments)."""
  if param_sharding not in PARAM_SHARDINGS:
    raise ValueError(f"param_sharding must be one of {PARAM_SHARDINGS}, got {param_sharding!r}")
  spec: list[Any] = [None] * len(shape)
  if len(shape) != 2:
    return P(*spec)
  name = _leaf_name(path)
  model_size, fsdp_size = mesh.shape["model"], mesh.shape["fsdp"]
  if param_sharding == "fsdp_model" and model_size > 1:
    dim = 1 if name in _COLUMN_PARALLEL else 0 if name in _ROW_PARALLEL else None
    if dim is not None and shape[dim] % model_size == 0:
      spec[dim] = "model"
  if param_sharding in ("fsdp", "fsdp_model") and fsdp_size > 1:
    free = [d for d in range(2) if spec[d] is None and shape[d] % fsdp_size == 0]
    if free:
      spec[max(free, key=lambda d: shape[d])] = "fsdp"
  return P(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, param_sharding: str = "replicated") -> Any:
  """NamedShardings for params, EMA and optimiser states (by leaf name and shape)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, dense_leaf_spec(path, tuple(leaf.shape), mesh, param_sharding)),
      abstract_tree)


def carry_shardings(abstract_carry: Any, mesh: Mesh) -> Any:
  """Every carry leaf has the batch first: split it like the batch."""
  return jax.tree.map(lambda _: batch_sharding(mesh), abstract_carry)


def state_shardings(abstract_state: Any, mesh: Mesh, param_sharding: str = "replicated") -> Any:
  """Shardings of a ``TrainState`` from its ``jax.eval_shape``."""
  return abstract_state.replace(
      step=replicated(mesh),
      params=tree_shardings(abstract_state.params, mesh, param_sharding),
      puzzle_emb=table_sharding(mesh),
      opt_state=tree_shardings(abstract_state.opt_state, mesh, param_sharding),
      ema_params=(None if abstract_state.ema_params is None
                  else tree_shardings(abstract_state.ema_params, mesh, param_sharding)),
      rng=replicated(mesh),
  )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh, global_batch_size: int) -> dict[str, jax.Array]:
  """Assembles this process's rows into global arrays split over data x fsdp."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (global_batch_size,) + np.shape(v)[1:])
          for k, v in local_batch.items()}


def pad_table(table: jax.Array | np.ndarray, rows: int) -> np.ndarray | jax.Array:
  """Zero rows appended (or trailing rows dropped) to reach ``rows``."""
  n = table.shape[0]
  if rows == n:
    return table
  if rows < n:
    return table[:rows]
  return jnp.pad(table, ((0, rows - n), (0, 0))) if isinstance(table, jax.Array) else np.pad(
      table, ((0, rows - n), (0, 0)))
