"""The weights file of ``config.init_weights``: format, names, puzzle table.

Two formats, told apart by their content (not their suffix): an ``.npz`` of
original-named arrays (what ``--mode=export`` writes), and the original's own
``torch.save(model.state_dict())`` files (``.pt``, ``.pth``, or the
extensionless ``step_<n>`` files its runs write), read without torch by
``torch_checkpoint``. Names may carry the wrappers of either side
(``param/``, ``_orig_mod.``, ``model.``; see ``weights.original_name``).

The loaded file must be a checkpoint of this model config: a missing weight,
a wrong shape or a weight this config does not have (another architecture,
more layers) is a ``ValueError`` naming the file and the weight. The one
exception is the puzzle-embedding table's row count, which belongs to the
dataset (one row per puzzle identifier), not to the model: when it differs,
the table is rebuilt as the original's ``load_checkpoint`` does, every row
set to the mean of the checkpoint's rows, with a notice.
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from trm_jax import torch_checkpoint
from trm_jax import weights
from trm_jax import models


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of an ``.npz`` or ``torch.save`` file, by its saved name."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"init_weights {str(path)!r}: no such file")
  if torch_checkpoint.is_torch_file(path):
    return torch_checkpoint.load(path)
  if not zipfile.is_zipfile(path):
    with open(path, "rb") as f:
      if f.read(4) == b"PK\x03\x04":  # the start of a zip whose end is missing
        raise ValueError(f"{path}: a truncated or corrupt zip file (torch.save and .npz files are zip files)")
    raise ValueError(f"{path}: not a weights file (expected an .npz of original-named arrays or a torch.save "
                     "state dict)")
  try:
    with np.load(path, allow_pickle=False) as z:
      state = {k: z[k] for k in z.files}
  except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({torch_checkpoint.one_line(e)})") from None
  for name, value in state.items():
    if not isinstance(value, np.ndarray):
      raise ValueError(f"{path}: member {name!r} is not an .npy array (expected an .npz of original-named "
                       "arrays or a torch.save state dict)")
  return state


def mean_rows(table: np.ndarray, num_rows: int) -> np.ndarray:
  """The original's reset of a puzzle table of another size: ``num_rows`` copies of its mean row."""
  mean = np.asarray(table, np.float64).mean(axis=0, keepdims=True).astype(np.float32)
  return np.repeat(mean, num_rows, axis=0)


def fit_puzzle_table(config: models.ModelConfig, state: dict[str, Any], source: str) -> str | None:
  """Resets the puzzle table in ``state`` (original-named) when its row count differs; the notice or None."""
  table = state.get(weights.PUZZLE_EMB_NAME)
  rows = config.num_puzzle_identifiers
  if (table is None or not config.puzzle_emb_ndim or np.ndim(table) != 2
      or table.shape[1] != config.puzzle_emb_ndim or table.shape[0] == rows or table.shape[0] == 0):
    return None  # nothing to fit, or a mismatch that import_state_dict reports
  state[weights.PUZZLE_EMB_NAME] = mean_rows(table, rows)
  return (f"init_weights {source}: the puzzle-embedding table has {table.shape[0]} rows, the dataset "
          f"{rows} puzzle identifiers: every row set to the mean of the checkpoint's rows (as the original's "
          f"load_checkpoint)")


def _check_no_extra_weights(config: models.ModelConfig, state: dict[str, Any], source: str) -> None:
  expected = set(weights.original_names(config))
  if config.puzzle_emb_ndim:
    expected.add(weights.PUZZLE_EMB_NAME)
  extra = [name for name in state if name not in expected]
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(f"{source}: weight {extra[0]!r}{more} is not in this model config: a checkpoint of "
                     f"another architecture or model config (this one: L_layers={config.L_layers}, "
                     f"mlp_t={config.mlp_t}, pos_encodings={config.pos_encodings!r}, "
                     f"puzzle_emb_ndim={config.puzzle_emb_ndim})")


def load(config: models.ModelConfig, path: str | os.PathLike) -> tuple[dict[str, Any], np.ndarray, list[str]]:
  """``(params, puzzle_emb_table, notices)`` from a weights file for this model config.

  Every problem is a one-line ``ValueError`` naming the file.
  """
  source = str(path)
  state: dict[str, Any] = {}
  for key, value in read_state_dict(path).items():
    name = weights.original_name(key)
    if name in state:
      raise ValueError(f"{source}: weight {name!r} appears twice (as {key!r})")
    state[name] = value
  for name, value in state.items():
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"{source}: weight {name!r} is {value.dtype}, expected a floating-point tensor")
  _check_no_extra_weights(config, state, source)
  notices = [n for n in [fit_puzzle_table(config, state, source)] if n]
  params, table = weights.import_state_dict(config, state, source=source)
  return params, table, notices
