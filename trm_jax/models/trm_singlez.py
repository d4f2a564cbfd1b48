"""TRM-singlez, the paper's one-latent ablation (SPEC §11; the original's ``trm_singlez``).

One latent ``z_L`` (reset to ``L_init``; there is no ``H_init``) and one
network. Per H cycle: ``L_cycles`` times ``z = f(z + x)``, then ``z = f(z)``
(no injection); ``H_cycles - 1`` cycles without gradient, the last with. The
heads read ``z``. ACT as TRM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from trm_jax.models import base


@dataclasses.dataclass(frozen=True)
class TRMSingleZConfig(base.ModelConfig):
  arch = "trm_singlez"


def recursion(config: base.ModelConfig, params: Mapping[str, Any], latents: Mapping[str, jax.Array],
              inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
              ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """One supervision step: ``({"z_L"}, logits, q)``, gradients through the last H cycle only."""
  net = ARCHITECTURE.network(config)
  f = base.level_fn(net, "L_level")

  def run_cycle(p, x_BxSxD, cos, sin, z):
    def update(z, _):
      # The original adds x before the network; f(z, x) adds it first too.
      return f(p, z, x_BxSxD, cos, sin), None
    z = base.cycle_scan(update, z, config.L_cycles)
    return f(p, z, None, cos, sin)

  x_BxSxD, cos, sin = base.prepare(net, params, inputs_BxS, puzzle_rows_BxE)
  z = latents["z_L"].astype(config.dtype)
  if config.H_cycles > 1:
    params_ng, x_ng = jax.lax.stop_gradient((params, x_BxSxD))

    def no_grad_cycle(z, _):
      return run_cycle(params_ng, x_ng, cos, sin, z), None
    z = base.cycle_scan(no_grad_cycle, z, config.H_cycles - 1)
    z = jax.lax.stop_gradient(z)
  z = run_cycle(params, x_BxSxD, cos, sin, z)
  logits_BxSxV, q_Bx2 = base.heads(net, params, z)
  return jax.lax.stop_gradient({"z_L": z}), logits_BxSxV, q_Bx2


def block_calls(config: base.ModelConfig) -> tuple[int, int]:
  per_cycle = (config.L_cycles + 1) * config.L_layers
  return config.H_cycles * per_cycle, per_cycle


ARCHITECTURE = base.Architecture(
    name="trm_singlez", config_class=TRMSingleZConfig,
    latents=(("z_L", "L_init"),),
    levels=(("L_level", "L_layers"),),
    recursion=recursion, block_calls=block_calls,
    halt_on_q_continue=base.trm_act_continue, q_continue_target=base.trm_act_continue)
