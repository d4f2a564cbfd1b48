"""Sudoku-Extreme 1k x 1000 augmentations (SPEC §10), 1 GPU in the paper.

Variants: ``configs/sudoku.py:mlp`` (default; mlp_t, no position encoding,
87.4% in the paper) and ``configs/sudoku.py:att`` (attention + RoPE, 74.7%).
"""

from configs import default


def get_config(arg: str | None = None):
  arg = arg or "mlp"
  if arg not in ("mlp", "att"):
    raise ValueError(f"configs/sudoku.py: unknown variant {arg!r}; expected 'mlp' or 'att'")
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
  c.lock()
  return c
