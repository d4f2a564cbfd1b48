"""Writes golden-format model files from this implementation (for tests).

The shared golden files come from the original code for three configurations;
these synthetic files exercise the checker on configurations those files do
not cover (and, perturbed, prove that it fails when it should).
"""

import dataclasses
import json

import jax
import numpy as np

from trm_jax import act
from trm_jax import losses
from trm_jax import weights
from trm_jax.models import trm


def random_batch(rng: np.random.Generator, config: trm.TRMConfig, batch_size: int) -> dict[str, np.ndarray]:
  inputs = rng.integers(0, config.vocab_size, (batch_size, config.seq_len)).astype(np.int32)
  labels = rng.integers(0, config.vocab_size, (batch_size, config.seq_len)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.3] = -100
  labels[-1] = -100  # a row with no valid label, as in the shared files
  ids = rng.integers(0, config.num_puzzle_identifiers, (batch_size,)).astype(np.int32)
  return {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids}


def make_model_file(path, config: trm.TRMConfig, batch_size: int, seed: int = 0, traj_steps: int = 3,
                    block_scale: float = 0.5) -> None:
  """Random non-zero weights (as the shared files), then every golden entry."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.asarray, trm.init_params(config, jax.random.key(seed)))
  # Non-zero everywhere so that every path matters; small block weights keep
  # the recursion from being chaotic.
  state = weights.export_state_dict(config, params, None)
  for name in state:
    scale = block_scale if ".L_level." in name else 1.0
    state[name] = (rng.standard_normal(state[name].shape) * scale / np.sqrt(state[name].shape[-1])
                   ).astype(np.float32)
  if config.puzzle_emb_ndim:
    state[weights.PUZZLE_EMB_NAME] = rng.standard_normal(
        (config.num_puzzle_identifiers, config.puzzle_emb_ndim)).astype(np.float32)
  params, table = weights.import_state_dict(config, state)
  out = {f"param/{k}": v for k, v in state.items()}
  cfg = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
         if f.name not in ("kernels", "remat", "kernel_params")}
  cfg["batch_size"] = batch_size
  out["config_json"] = np.asarray(json.dumps(cfg))
  out["block_scale"] = np.asarray(block_scale)
  batch = random_batch(rng, config, batch_size)
  out.update({f"batch/{k}": v for k, v in batch.items()})

  def record(prefix, carry, loss, metrics, outputs):
    out[prefix + "loss"] = np.asarray(loss, np.float64)
    for k, v in metrics.items():
      out[prefix + "metric/" + k] = np.asarray(v)
    out[prefix + "halted"] = np.asarray(carry.halted)
    out[prefix + "steps"] = np.asarray(carry.steps)
    out[prefix + "q_halt_logits"] = np.asarray(outputs["q_halt_logits"])

  eval_call = jax.jit(lambda p, t, c, b: losses.act_call(config, p, t, c, b, train=False))
  train_call = jax.jit(lambda p, t, c, b: losses.act_call(config, p, t, c, b, train=True))
  with jax.default_matmul_precision("highest"):
    carry = act.initial_carry(config, batch)
    for t in range(config.halt_max_steps):
      carry, loss, metrics, outputs = eval_call(params, table, carry, batch)
      g = f"eval/{t}/"
      record(g, carry, loss, metrics, outputs)
      out[g + "logits"] = np.asarray(outputs["logits"])
      out[g + "q_continue_logits"] = np.asarray(outputs["q_continue_logits"])
      for name, z in carry.latents.items():
        out[g + name] = np.asarray(z)

    carry = act.reset_carry(config, params, act.initial_carry(config, batch), batch)
    rows = losses.gather_puzzle_rows(config, table, carry)
    (loss, (_, metrics, _)), (grads, row_grads) = jax.jit(jax.value_and_grad(
        lambda p, r: losses.act_loss(config, p, r, carry, train=True), argnums=(0, 1), has_aux=True))(params, rows)
    out["train0/loss"] = np.asarray(loss, np.float64)
    for k, v in metrics.items():
      out["train0/metric/" + k] = np.asarray(v)
    grad_state = weights.export_state_dict(config, grads, None)
    for name in weights.trainable_original_names(config):
      out[f"grad/{name}"] = grad_state[name]
    if config.puzzle_emb_ndim:
      out["grad/puzzle_emb_local"] = np.asarray(row_grads)

    carry = act.initial_carry(config, batch)
    for t in range(traj_steps):
      tb = random_batch(rng, config, batch_size)
      carry, loss, metrics, outputs = train_call(params, table, carry, tb)
      g = f"traj/{t}/"
      out.update({f"{g}batch/{k}": v for k, v in tb.items()})
      record(g, carry, loss, metrics, outputs)
      out[g + "current_inputs"] = np.asarray(carry.current_data["inputs"])
    if config.puzzle_emb_ndim:
      out["grad/puzzle_emb_local_ids"] = np.asarray(carry.current_data["puzzle_identifiers"])
  np.savez(path, **out)
