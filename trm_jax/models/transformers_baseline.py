"""The plain-transformer baseline in the ACT loop (SPEC §11; the original's ``transformers_baseline``).

``H_level``, ``H_layers`` attention blocks, and the carry ``z_H`` (reset to
``H_init``). One step: ``z_H = f_H(z_H, x)``, with gradient; no cycles
(``H_cycles`` is ignored, as in the original). P ignores
``puzzle_emb_len``. ACT: training halts on ``q_halt > q_continue``; no
Q-continue target and no ``q_continue`` loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from trm_jax.models import base


@dataclasses.dataclass(frozen=True)
class TransformersBaselineConfig(base.ModelConfig):
  arch = "transformers_baseline"
  uses_puzzle_emb_len = False

  def check_arch(self) -> None:
    where = "for arch='transformers_baseline'"
    if self.H_layers < 1:
      self.fail("H_layers", f"a positive integer {where} (the blocks of H_level)")
    if self.pos_encodings not in ("rope", "learned"):
      self.fail("pos_encodings", f"'rope' or 'learned' {where}")
    if self.mlp_t:
      self.fail("mlp_t", f"False {where} (attention blocks only)")


def recursion(config: base.ModelConfig, params: Mapping[str, Any], latents: Mapping[str, jax.Array],
              inputs_BxS: jax.Array, puzzle_rows_BxE: jax.Array | None
              ) -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
  """One supervision step: ``({"z_H"}, logits, q)``."""
  net = ARCHITECTURE.network(config)
  x_BxSxD, cos, sin = base.prepare(net, params, inputs_BxS, puzzle_rows_BxE)
  z_H = base.level_fn(net, "H_level")(params, latents["z_H"].astype(config.dtype), x_BxSxD, cos, sin)
  logits_BxSxV, q_Bx2 = base.heads(net, params, z_H)
  return jax.lax.stop_gradient({"z_H": z_H}), logits_BxSxV, q_Bx2


def block_calls(config: base.ModelConfig) -> tuple[int, int]:
  return config.H_layers, config.H_layers


ARCHITECTURE = base.Architecture(
    name="transformers_baseline", config_class=TransformersBaselineConfig,
    latents=(("z_H", "H_init"),),
    levels=(("H_level", "H_layers"),),
    recursion=recursion, block_calls=block_calls,
    halt_on_q_continue=base.always, q_continue_target=base.never,
    paper_settings=dict(H_layers=8, num_heads=12, H_cycles=1), has_cycles=False)
