"""The registry of architectures: ``config.model.arch`` -> its module's ``ARCHITECTURE``.

Each architecture is one module of this package exposing a
``base.Architecture`` (see ``trm_jax.models.base``); adding one is one new
module and one line in ``_MODULES``.
"""

from __future__ import annotations

from typing import Any, Mapping

from trm_jax.models import base
from trm_jax.models import hrm
from trm_jax.models import transformers_baseline
from trm_jax.models import trm
from trm_jax.models import trm_hier6
from trm_jax.models import trm_singlez

_MODULES = (trm, trm_singlez, trm_hier6, hrm, transformers_baseline)

ARCHITECTURES: dict[str, base.Architecture] = {m.ARCHITECTURE.name: m.ARCHITECTURE for m in _MODULES}
DEFAULT_ARCH = "trm"
# Every fixed initial vector of any architecture: never trained.
FROZEN_PARAMS = tuple(sorted({init for a in ARCHITECTURES.values() for init in a.init_names}))

ModelConfig = base.ModelConfig
init_puzzle_emb = base.init_puzzle_emb


def get(name: str) -> base.Architecture:
  """The architecture called ``name``; a one-line error listing the choices otherwise."""
  if name not in ARCHITECTURES:
    raise ValueError(f"model config: arch={name!r}: expected one of {tuple(ARCHITECTURES)}")
  return ARCHITECTURES[name]


def of(config: base.ModelConfig) -> base.Architecture:
  """The architecture of a model config."""
  return get(config.arch)


def config_from_dict(d: Mapping[str, Any], *, source: str = "config") -> base.ModelConfig:
  """The config of ``d["arch"]`` (default ``trm``) from a mapping; other keys that are not
  model fields are ignored."""
  return get(d.get("arch", DEFAULT_ARCH)).config_class.from_dict(d, source=source)
