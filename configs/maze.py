"""Maze-Hard 1k (SPEC §10): attention + RoPE, 4 GPUs in the paper.

Another architecture with its paper settings: ``configs/maze.py:hrm`` (any of
``trm_jax.models.ARCHITECTURES``).
"""

import ml_collections

from trm_jax.configs import default
from trm_jax import tasks


def get_config(arg: str | None = None):
  _, arch = default.parse_variant(arg, "configs/maze.py")
  c = default.get_config()
  c.data_path = "data/maze-30x30-hard-1k"
  c.epochs = 50000
  c.eval_interval = 5000
  c.lr = 1e-4
  c.puzzle_emb_lr = 1e-4
  c.weight_decay = 1.0
  c.puzzle_emb_weight_decay = 1.0
  c.ema = True
  c.model.L_cycles = 4
  c.model.remat = "network"  # same shapes as ARC: see configs/arc.py for why
  c.evaluators = ml_collections.ConfigDict({"maze": tasks.evaluator_config("maze")})
  c.best_metric = "all/exact_accuracy"
  default.apply_arch(c, arch)
  c.lock()
  return c
