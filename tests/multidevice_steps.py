"""Run by tests/test_sharding.py in a subprocess with 8 CPU devices.

Trains a tiny model a few steps on one device and on several meshes of the
8 devices, and prints the largest differences as JSON. An optional argument
names the architecture (default ``trm``).
"""

import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from trm_jax import act
from trm_jax import optim
from trm_jax import sharding
from trm_jax import state as state_lib
from trm_jax import models
from trm_jax import steps

B = 16
MODEL = models.config_from_dict(dict(
    arch=sys.argv[1] if len(sys.argv) > 1 else "trm", seq_len=8, vocab_size=6, num_puzzle_identifiers=37,
    hidden_size=32, num_heads=4, expansion=2.0, L_layers=1, H_layers=1, H_cycles=2, L_cycles=2, puzzle_emb_ndim=32,
    puzzle_emb_len=1, halt_max_steps=3, forward_dtype="float32", halt_exploration_prob=0.5))
OPT = optim.make_optimizers(lr=3e-3, weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, beta1=0.9,
                            beta2=0.95, warmup_steps=2, total_steps=100, lr_min_ratio=0.5,
                            trainable_mask=state_lib.trainable_mask)


def batches(n):
  rng = np.random.default_rng(0)
  for _ in range(n):
    yield {"inputs": rng.integers(1, 6, (B, 8)).astype(np.int32),
           "labels": rng.integers(1, 6, (B, 8)).astype(np.int32),
           "puzzle_identifiers": rng.integers(0, 37, (B,)).astype(np.int32)}


def train(mesh, param_sharding, num_steps=4):
  rows = sharding.padded_table_rows(MODEL.num_puzzle_identifiers, mesh)
  create = lambda: state_lib.create_train_state(MODEL, OPT, 0, ema=True, puzzle_emb_rows=rows)
  state_sh = sharding.state_shardings(jax.eval_shape(create), mesh, param_sharding)
  state = jax.jit(create, out_shardings=state_sh)()
  batch_sh = sharding.batch_sharding(mesh)
  carry_fn = lambda: act.initial_carry(MODEL, {k: jnp.zeros(v.shape, v.dtype) for k, v in next(batches(1)).items()})
  carry_sh = sharding.carry_shardings(jax.eval_shape(carry_fn), mesh)
  carry = jax.jit(carry_fn, out_shardings=carry_sh)()
  step = jax.jit(steps.make_train_step(MODEL, OPT, B, 0.9), in_shardings=(state_sh, carry_sh, batch_sh),
                 out_shardings=(state_sh, carry_sh, sharding.replicated(mesh)), donate_argnums=(0, 1))
  metrics = []
  for b in batches(num_steps):
    state, carry, m = step(state, carry, sharding.global_batch(b, mesh, B))
    metrics.append(m)
  shard_rows = {s.data.shape[0] for s in state.puzzle_emb.addressable_shards}
  qkv = state.params["L_level"]["layers_0"]["self_attn"]["qkv_proj"]
  qkv_shard = sorted({tuple(s.data.shape) for s in qkv.addressable_shards})
  host = jax.tree.map(np.asarray, (state.params, state.ema_params, state.puzzle_emb[:MODEL.num_puzzle_identifiers],
                                   jax.device_get(metrics)))
  return host, {"table_shard_rows": sorted(shard_rows), "qkv_shard_shapes": qkv_shard}


def max_rel(a, b):
  errs = jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(np.asarray(x, np.float64) - y).max() / max(np.abs(y).max(), 1e-12)), a, b))
  return max(errs)


def main():
  assert jax.device_count() == 8, jax.device_count()
  single, _ = train(sharding.make_mesh(devices=jax.devices()[:1]), "replicated")
  out = {}
  for name, shape, ps in [("data8", sharding.MeshShape(data=8), "replicated"),
                          ("data4_fsdp2", sharding.MeshShape(data=4, fsdp=2), "fsdp"),
                          ("data2_fsdp2_model2", sharding.MeshShape(data=2, fsdp=2, model=2), "fsdp_model")]:
    got, info = train(sharding.make_mesh(shape), ps)
    out[name] = {"params": max_rel(got[0], single[0]), "ema": max_rel(got[1], single[1]),
                 "table": max_rel(got[2], single[2]), "metrics": max_rel(got[3], single[3]), **info}
  print(json.dumps(out))


if __name__ == "__main__":
  sys.exit(main())
