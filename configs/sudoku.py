"""Sudoku-Extreme 1k x 1000 augmentations (SPEC §10), 1 GPU in the paper.

Variants: ``configs/sudoku.py:mlp`` (default; mlp_t, no position encoding,
87.4% in the paper) and ``configs/sudoku.py:att`` (attention + RoPE, 74.7%).
Another architecture with its paper settings: ``configs/sudoku.py:att,hrm``
(``transformers_baseline`` needs ``att``: it has attention blocks only).
"""

from trm_jax.configs import default


def get_config(arg: str | None = None):
  arg, arch = default.parse_variant(arg, "configs/sudoku.py", ("mlp", "att"), "mlp")
  c = default.get_config()
  c.data_path = "data/sudoku-extreme-1k-aug-1000"
  c.epochs = 50000
  c.eval_interval = 5000
  c.lr = 1e-4
  c.puzzle_emb_lr = 1e-4
  c.weight_decay = 1.0
  c.puzzle_emb_weight_decay = 1.0
  c.ema = True
  c.model.L_cycles = 6
  if arg == "mlp":
    c.model.mlp_t = True
    c.model.pos_encodings = "none"
  default.apply_arch(c, arch)
  c.lock()
  return c
