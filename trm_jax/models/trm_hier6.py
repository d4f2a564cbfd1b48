"""TRM-hier6, the paper's six-latent ablation (SPEC §11; the original's ``trm_hier6``).

The answer ``z_H`` and six latents ``z_L1 .. z_L6`` (reset to ``H_init``,
``L1_init .. L6_init``), one network. Per H cycle, for ``l < L_cycles``:
``z_L[l] = f(z_L1 + ... + z_L6, z_H + x)``, then
``z_H = f(z_H, z_L1 + ... + z_L6)``; the sums run in that order, as the
original's. Latents past ``L_cycles`` keep their reset value. Gradient and
heads as TRM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from trm_jax.models import base

NUM_LATENTS = 6
LATENT_NAMES = tuple(f"z_L{k}" for k in range(1, NUM_LATENTS + 1))


@dataclasses.dataclass(frozen=True)
class TRMHier6Config(base.ModelConfig):
  arch = "trm_hier6"

  def check_arch(self) -> None:
    if self.L_cycles > NUM_LATENTS:
      self.fail("L_cycles", f"at most {NUM_LATENTS} for arch='trm_hier6' (one latent per L cycle)")


def _sum(zs):
  total = zs[0]
  for z in zs[1:]:
    total = total + z
  return total


def recursion(config: base.ModelConfig, params: Mapping[str, Any], latents: Mapping[str, jax.Array],
              inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
              ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """One supervision step: ``({"z_H", "z_L1".."z_L6"}, logits, q)``."""
  net = ARCHITECTURE.network(config)
  f = base.level_fn(net, "L_level")

  def run_cycle(p, x_BxSxD, cos, sin, z_H, zs):
    # At most six L cycles, unrolled: each writes a different latent.
    zs = list(zs)
    for l in range(config.L_cycles):
      zs[l] = f(p, _sum(zs), z_H + x_BxSxD, cos, sin)
    z_H = f(p, z_H, _sum(zs), cos, sin)
    return z_H, tuple(zs)

  x_BxSxD, cos, sin = base.prepare(net, params, inputs_BxS, puzzle_rows_BxE)
  dtype = config.dtype
  z_H = latents["z_H"].astype(dtype)
  zs = tuple(latents[name].astype(dtype) for name in LATENT_NAMES)
  if config.H_cycles > 1:
    params_ng, x_ng = jax.lax.stop_gradient((params, x_BxSxD))

    def no_grad_cycle(carry, _):
      return run_cycle(params_ng, x_ng, cos, sin, *carry), None
    (z_H, zs) = base.cycle_scan(no_grad_cycle, (z_H, zs), config.H_cycles - 1)
    z_H, zs = jax.lax.stop_gradient((z_H, zs))
  z_H, zs = run_cycle(params, x_BxSxD, cos, sin, z_H, zs)
  logits_BxSxV, q_Bx2 = base.heads(net, params, z_H)
  return jax.lax.stop_gradient({"z_H": z_H, **dict(zip(LATENT_NAMES, zs))}), logits_BxSxV, q_Bx2


def block_calls(config: base.ModelConfig) -> tuple[int, int]:
  per_cycle = (config.L_cycles + 1) * config.L_layers
  return config.H_cycles * per_cycle, per_cycle


ARCHITECTURE = base.Architecture(
    name="trm_hier6", config_class=TRMHier6Config,
    latents=(("z_H", "H_init"),) + tuple((name, f"L{k}_init") for k, name in enumerate(LATENT_NAMES, 1)),
    levels=(("L_level", "L_layers"),),
    recursion=recursion, block_calls=block_calls,
    halt_on_q_continue=base.trm_act_continue, q_continue_target=base.trm_act_continue)
