"""TRM: one network, the answer ``z_H`` and the latent ``z_L`` (SPEC §1–§4).

``recursion`` is the pure function of one supervision step: ``H_cycles - 1``
cycles under ``stop_gradient`` and one with gradient, each cycle
``L_cycles`` latent updates and one answer update, as ``jax.lax.scan`` loops
(unrolled when short, ``base.MAX_UNROLLED_CYCLES``).

The puzzle embedding table is *not* a dense parameter: it has its own
optimiser (sparse SignSGD), is sharded by rows, and is far larger than the
network (about 900k x 512 for ARC), so the caller gathers the rows of the
batch and passes them in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from trm_jax.models import base

# Kept here for the callers that predate the seam.
POS_ENCODINGS = base.POS_ENCODINGS
FORWARD_DTYPES = base.FORWARD_DTYPES
LOSS_TYPES = base.LOSS_TYPES
REMAT_POLICIES = base.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class TRMConfig(base.ModelConfig):
  """TRM's config: the shared fields (``H_layers`` unused: one network serves both levels)."""
  arch = "trm"


def recursion(config: base.ModelConfig, params: Mapping[str, Any], latents: Mapping[str, jax.Array],
              inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
              ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """One supervision step (SPEC §3).

  Returns ``({"z_H", "z_L"}, logits [B, S, V], q [B, 2])``; the returned
  latents are under ``stop_gradient``. Gradients reach ``params`` and
  ``puzzle_rows`` only through the last H cycle.
  """
  net = ARCHITECTURE.network(config)
  f = base.level_fn(net, "L_level")

  def run_cycle(p, x_BxSxD, cos, sin, z_H, z_L):
    """One H cycle: L_cycles latent updates, then one answer update."""
    def latent_update(z_L, _):
      return f(p, z_L, z_H + x_BxSxD, cos, sin), None
    z_L = base.cycle_scan(latent_update, z_L, config.L_cycles)
    z_H = f(p, z_H, z_L, cos, sin)
    return z_H, z_L

  x_BxSxD, cos, sin = base.prepare(net, params, inputs_BxS, puzzle_rows_BxE)
  dtype = config.dtype
  z_H, z_L = latents["z_H"].astype(dtype), latents["z_L"].astype(dtype)
  if config.H_cycles > 1:
    # No gradient here: stopping it at the inputs (not only the outputs) keeps
    # autodiff from even tracing these cycles.
    params_ng, x_ng = jax.lax.stop_gradient((params, x_BxSxD))

    def no_grad_cycle(carry, _):
      return run_cycle(params_ng, x_ng, cos, sin, *carry), None
    (z_H, z_L) = base.cycle_scan(no_grad_cycle, (z_H, z_L), config.H_cycles - 1)
    z_H, z_L = jax.lax.stop_gradient((z_H, z_L))
  z_H, z_L = run_cycle(params, x_BxSxD, cos, sin, z_H, z_L)
  logits_BxSxV, q_Bx2 = base.heads(net, params, z_H)
  return jax.lax.stop_gradient({"z_H": z_H, "z_L": z_L}), logits_BxSxV, q_Bx2


def block_calls(config: base.ModelConfig) -> tuple[int, int]:
  per_cycle = (config.L_cycles + 1) * config.L_layers
  return config.H_cycles * per_cycle, per_cycle


ARCHITECTURE = base.Architecture(
    name="trm", config_class=TRMConfig,
    latents=(("z_H", "H_init"), ("z_L", "L_init")),
    levels=(("L_level", "L_layers"),),
    recursion=recursion, block_calls=block_calls,
    halt_on_q_continue=base.trm_act_continue, q_continue_target=base.trm_act_continue)


def init_params(config: base.ModelConfig, rng: jax.Array) -> dict[str, Any]:
  """Initial dense parameters (SPEC §2), float32."""
  return ARCHITECTURE.init_params(config, rng)


init_puzzle_emb = base.init_puzzle_emb
