"""Run by tests/test_test_time.py in a subprocess with 8 CPU devices.

Evaluates a tiny model with noisy trajectories and halting on one device and
on a (data=4, fsdp=2) mesh of the 8, jitted with the batch sharded as a run's
evaluation is, and checks that the answers are the same and the K-fold batch
stays split over the devices.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from trm_jax import sharding
from trm_jax import test_time
from trm_jax.models import trm

B = 16
MODEL = trm.TRMConfig(seq_len=8, vocab_size=6, num_puzzle_identifiers=16, hidden_size=16, num_heads=2,
                      expansion=2.0, L_layers=1, H_cycles=2, L_cycles=1, puzzle_emb_ndim=16, puzzle_emb_len=1,
                      halt_max_steps=3, forward_dtype="float32", halt_exploration_prob=0.0)
OPTIONS = test_time.EvalOptions(trajectories=4, noise_sigma=0.5, halt=True)


def evaluate(mesh):
  params = trm.init_params(MODEL, jax.random.PRNGKey(0))
  params["q_head_kernel"] = jax.random.normal(jax.random.PRNGKey(1), (MODEL.hidden_size, 2))
  params["q_head_bias"] = jnp.array([-2.0, 0.0])
  rows = sharding.padded_table_rows(MODEL.num_puzzle_identifiers, mesh)
  table = jnp.pad(jax.random.normal(jax.random.PRNGKey(2), (16, 16)), ((0, rows - 16), (0, 0)))
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(1, 6, (B, 8)).astype(np.int32),
           "labels": rng.integers(1, 6, (B, 8)).astype(np.int32),
           "puzzle_identifiers": rng.integers(0, 16, (B,)).astype(np.int32)}
  batch_sh = sharding.batch_sharding(mesh)
  fn = jax.jit(test_time.make_eval_step(MODEL, OPTIONS, batch_sharding=batch_sh),
               in_shardings=(sharding.replicated(mesh), sharding.table_sharding(mesh), batch_sh),
               out_shardings=(sharding.replicated(mesh), batch_sh))
  metrics, outputs = fn(params, table, sharding.global_batch(batch, mesh, B))
  shards = {s.data.shape[0] for s in outputs["preds"].addressable_shards}
  return jax.device_get(metrics), jax.device_get(outputs), shards


def main():
  assert jax.device_count() == 8, jax.device_count()
  one_metrics, one_outputs, _ = evaluate(sharding.make_mesh(devices=jax.devices()[:1]))
  metrics, outputs, shards = evaluate(sharding.make_mesh(sharding.MeshShape(data=4, fsdp=2)))
  assert shards == {B // 8}, shards
  assert 0 < int(one_metrics["steps"]) < 3 * B, one_metrics  # some rows halted early
  for key in one_metrics:
    np.testing.assert_allclose(metrics[key], one_metrics[key], rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(outputs["preds"], one_outputs["preds"])
  np.testing.assert_allclose(outputs["q_halt_logits"], one_outputs["q_halt_logits"], rtol=1e-5, atol=1e-5)
  print("same on 1 and 8 devices:", {k: float(v) for k, v in one_metrics.items()})


if __name__ == "__main__":
  main()
