"""Weights in the original's state-dict naming, both ways.

The original (PyTorch) names every weight ``inner.<module path>.<name>`` and
stores linear weights ``[out, in]``; this project stores them ``[in, out]``
and keeps the puzzle-embedding table outside the dense parameters. The
mapping is explicit here, so checkpoints move between the two
implementations: ``import_state_dict`` takes a mapping of names to arrays
(e.g. ``torch.load(...)`` converted with ``.numpy()``, or the golden files'
``param/...`` entries) and ``export_state_dict`` gives one back.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from trm_jax import models
from trm_jax.models import layers

PREFIX = "inner."
PUZZLE_EMB_NAME = "inner.puzzle_emb.weights"


def _linear_names(config: models.ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[int, int]]]:
  """(original name, our path, our [in, out] shape) for every transposed weight."""
  d, v = config.hidden_size, config.vocab_size
  inter = layers.swiglu_intermediate_size(d, config.expansion)
  attn = config.num_heads * config.head_dim  # the attention's inner width (< d when heads do not divide d)
  out = [("inner.lm_head.weight", ("lm_head",), (d, v)),
         ("inner.q_head.weight", ("q_head_kernel",), (d, 2))]
  for level, layers_field in models.of(config).levels:
    for i in range(getattr(config, layers_field)):
      orig = f"inner.{level}.layers.{i}"
      ours = (level, f"layers_{i}")
      if config.mlp_t:
        w = config.num_positions
        inter_t = layers.swiglu_intermediate_size(w, config.expansion)
        out += [(f"{orig}.mlp_t.gate_up_proj.weight", ours + ("mlp_t", "gate_up_proj"), (w, 2 * inter_t)),
                (f"{orig}.mlp_t.down_proj.weight", ours + ("mlp_t", "down_proj"), (inter_t, w))]
      else:
        out += [(f"{orig}.self_attn.qkv_proj.weight", ours + ("self_attn", "qkv_proj"), (d, 3 * attn)),
                (f"{orig}.self_attn.o_proj.weight", ours + ("self_attn", "o_proj"), (attn, d))]
      out += [(f"{orig}.mlp.gate_up_proj.weight", ours + ("mlp", "gate_up_proj"), (d, 2 * inter)),
              (f"{orig}.mlp.down_proj.weight", ours + ("mlp", "down_proj"), (inter, d))]
  return out


def _init_names(config: models.ModelConfig) -> list[str]:
  """The original names of the fixed initial vectors (buffers there, frozen here)."""
  return [PREFIX + init for init in models.of(config).init_names]


def _plain_names(config: models.ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
  """(original name, our path, shape) for every weight stored the same way in both."""
  d = config.hidden_size
  out = [("inner.embed_tokens.embedding_weight", ("embed_tokens",), (config.vocab_size, d)),
         ("inner.q_head.bias", ("q_head_bias",), (2,))]
  out += [(name, (name[len(PREFIX):],), (d,)) for name in _init_names(config)]
  if config.pos_encodings == "learned":
    out.append(("inner.embed_pos.embedding_weight", ("embed_pos",), (config.num_positions, d)))
  return out


def original_names(config: models.ModelConfig) -> list[str]:
  """Every dense weight name of the original for this config (not the puzzle table)."""
  return [n for n, _, _ in _plain_names(config)] + [n for n, _, _ in _linear_names(config)]


def trainable_original_names(config: models.ModelConfig) -> list[str]:
  """The names the original's optimiser trains (its buffers, the initial vectors, excluded)."""
  frozen = set(_init_names(config))
  return [n for n in original_names(config) if n not in frozen]


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


# What wraps the model's own names in saved state dicts: golden files' "param/",
# then torch.compile's "_orig_mod.", then the ACT loss head's "model." (the
# original's checkpoints name weights "_orig_mod.model.inner.<...>").
WRAPPER_PREFIXES = ("param/", "_orig_mod.", "model.")


def original_name(key: str) -> str:
  """A saved weight's name without its wrapper prefixes: ``inner.<module path>.<name>``."""
  for prefix in WRAPPER_PREFIXES:
    if key.startswith(prefix):
      key = key[len(prefix):]
  return key


def import_state_dict(config: models.ModelConfig, state: Mapping[str, Any], *, source: str = "state dict"
                      ) -> tuple[dict[str, Any], np.ndarray]:
  """Original-named weights -> ``(params, puzzle_emb_table)`` as float32 numpy.

  Names may carry a ``param/`` or ``model.``/``_orig_mod.`` prefix (golden
  files, saved ``torch.compile``d models). A missing name or a wrong shape
  raises a ValueError naming it.
  """
  normalised = {original_name(key): value for key, value in state.items()}

  def fetch(name, shape):
    if name not in normalised:
      raise ValueError(f"{source}: missing weight {name!r} (expected shape {list(shape)})")
    arr = np.asarray(normalised[name], dtype=np.float32)
    if arr.shape != tuple(shape):
      raise ValueError(f"{source}: weight {name!r} has shape {list(arr.shape)}, expected {list(shape)}")
    return arr

  params: dict[str, Any] = {}
  for name, path, shape in _plain_names(config):
    _set(params, path, fetch(name, shape))
  for name, path, shape in _linear_names(config):
    _set(params, path, np.ascontiguousarray(fetch(name, shape[::-1]).T))
  table_shape = (config.num_puzzle_identifiers, config.puzzle_emb_ndim)
  if config.puzzle_emb_ndim:
    table = fetch(PUZZLE_EMB_NAME, table_shape)
  else:
    table = np.zeros(table_shape, np.float32)
  return params, table


def export_state_dict(config: models.ModelConfig, params: Mapping[str, Any], puzzle_emb_table: Any | None
                      ) -> dict[str, np.ndarray]:
  """``(params, puzzle_emb_table)`` -> original-named float32 numpy arrays."""
  state = {}
  for name, path, _ in _plain_names(config):
    state[name] = np.asarray(_get(params, path), np.float32)
  for name, path, _ in _linear_names(config):
    state[name] = np.ascontiguousarray(np.asarray(_get(params, path), np.float32).T)
  if config.puzzle_emb_ndim and puzzle_emb_table is not None:
    state[PUZZLE_EMB_NAME] = np.asarray(puzzle_emb_table, np.float32)
  return state
