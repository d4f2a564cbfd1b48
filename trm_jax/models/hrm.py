"""HRM, the Hierarchical Reasoning Model TRM is compared against (SPEC §11; the original's ``hrm``).

Two networks, ``H_level`` (``H_layers`` blocks) and ``L_level``
(``L_layers`` blocks), and the carry ``z_H, z_L``. One step runs, without
gradient, ``H_cycles`` cycles of ``L_cycles`` low-level updates
``z_L = f_L(z_L, z_H + x)`` and one high-level update ``z_H = f_H(z_H, z_L)``,
minus the very last of each; then that last pair with gradient (the
"one-step gradient"). The heads read ``z_H``. P ignores ``puzzle_emb_len``.

ACT: training halts on ``q_halt > q_continue`` and always learns the
Q-continue target (a second forward from the new carry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from trm_jax.models import base


@dataclasses.dataclass(frozen=True)
class HRMConfig(base.ModelConfig):
  arch = "hrm"
  uses_puzzle_emb_len = False

  def check_arch(self) -> None:
    if self.H_layers < 1:
      self.fail("H_layers", "a positive integer for arch='hrm' (the blocks of H_level)")


def recursion(config: base.ModelConfig, params: Mapping[str, Any], latents: Mapping[str, jax.Array],
              inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
              ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """One supervision step: ``({"z_H", "z_L"}, logits, q)``, gradients through the last pair only."""
  net = ARCHITECTURE.network(config)
  f_L, f_H = base.level_fn(net, "L_level"), base.level_fn(net, "H_level")
  x_BxSxD, cos, sin = base.prepare(net, params, inputs_BxS, puzzle_rows_BxE)
  dtype = config.dtype
  z_H, z_L = latents["z_H"].astype(dtype), latents["z_L"].astype(dtype)
  params_ng, x_ng = jax.lax.stop_gradient((params, x_BxSxD))

  def low_updates(z_H, z_L, count):
    def update(z_L, _):
      return f_L(params_ng, z_L, z_H + x_ng, cos, sin), None
    z_L = base.cycle_scan(update, z_L, count)
    return z_L

  def no_grad_cycle(carry, _):
    z_H, z_L = carry
    z_L = low_updates(z_H, z_L, config.L_cycles)
    return (f_H(params_ng, z_H, z_L, cos, sin), z_L), None

  if config.H_cycles > 1:
    (z_H, z_L) = base.cycle_scan(no_grad_cycle, (z_H, z_L), config.H_cycles - 1)
  if config.L_cycles > 1:
    z_L = low_updates(z_H, z_L, config.L_cycles - 1)
  z_H, z_L = jax.lax.stop_gradient((z_H, z_L))
  z_L = f_L(params, z_L, z_H + x_BxSxD, cos, sin)
  z_H = f_H(params, z_H, z_L, cos, sin)
  logits_BxSxV, q_Bx2 = base.heads(net, params, z_H)
  return jax.lax.stop_gradient({"z_H": z_H, "z_L": z_L}), logits_BxSxV, q_Bx2


def block_calls(config: base.ModelConfig) -> tuple[int, int]:
  total = config.H_cycles * (config.L_cycles * config.L_layers + config.H_layers)
  return total, config.L_layers + config.H_layers


ARCHITECTURE = base.Architecture(
    name="hrm", config_class=HRMConfig,
    latents=(("z_H", "H_init"), ("z_L", "L_init")),
    levels=(("H_level", "H_layers"), ("L_level", "L_layers")),
    recursion=recursion, block_calls=block_calls,
    halt_on_q_continue=base.always, q_continue_target=base.always,
    paper_settings=dict(H_layers=4, L_layers=4, H_cycles=2, L_cycles=2))
