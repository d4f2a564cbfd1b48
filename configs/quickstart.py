"""The built-in default: a small TRM on generated sudokus that trains on a CPU.

The first run builds its dataset (a few seconds): generated sudokus with many
givens, a few hundred train puzzles x augmentations and a held-out test set
with no puzzle equivalent to a train puzzle. Variants:
``configs/quickstart.py:sudoku`` (default) and ``configs/quickstart.py:maze``
(10x10 mazes); add an architecture with ``,<arch>``, e.g.
``configs/quickstart.py:maze,hrm`` (its paper's layers and cycles at this width;
``transformers_baseline`` needs attention: the ``maze`` variant, or
``--config.model.mlp_t=False --config.model.pos_encodings=rope``).
"""

import ml_collections

from trm_jax.configs import default
from trm_jax import tasks


def get_config(arg: str | None = None):
  arg, arch = default.parse_variant(arg, "configs/quickstart.py", ("sudoku", "maze"), "sudoku")
  c = default.get_config()
  with c.unlocked():
    if arg == "sudoku":
      c.data_path = "data/quickstart-sudoku"
      c.data_build = "sudoku"
      c.data_build_args = ml_collections.ConfigDict(dict(num_train=300, num_test=200, num_aug=32, seed=0,
                                                         target_clues=45))
    else:
      c.data_path = "data/quickstart-maze"
      c.data_build = "maze"
      c.data_build_args = ml_collections.ConfigDict(dict(num_train=600, num_test=200, grid_size=10,
                                                         min_path_length=14, aug=True, seed=0))
  c.global_batch_size = 64
  c.epochs = 120
  c.eval_interval = 20
  c.lr = 1e-3
  c.puzzle_emb_lr = 1e-3
  c.weight_decay = 0.1
  c.puzzle_emb_weight_decay = 0.1
  c.lr_warmup_steps = 50
  c.ema = True
  c.ema_rate = 0.99
  c.log_every_steps = 25
  m = c.model
  m.hidden_size = 64
  m.num_heads = 4
  m.L_layers = 2
  m.H_cycles = 2
  m.L_cycles = 2
  m.halt_max_steps = 4
  m.puzzle_emb_len = 1
  m.forward_dtype = "float32"  # CPUs are slow at bfloat16
  if arg == "sudoku":
    m.mlp_t = True
    m.pos_encodings = "none"
  else:
    c.evaluators = ml_collections.ConfigDict({"maze": tasks.evaluator_config("maze")})
  # Another architecture: its paper's layers and cycles at the quickstart's width.
  default.apply_arch(c, arch, skip=("hidden_size", "num_heads"))
  c.lock()
  return c
