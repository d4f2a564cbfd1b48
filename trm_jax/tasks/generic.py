"""The generic task: data with no task-specific behaviour (a converted dataset, a new task's first run).

Its grids are drawn with a fixed palette (token ``t`` the ``t``-th colour);
it has no evaluator of its own and no ``--mode=predict``.
"""

from __future__ import annotations

import numpy as np

from trm_jax.tasks import arc
from trm_jax.tasks import base

PALETTE = np.concatenate([arc.COLOURS, arc.COLOURS // 2, arc.COLOURS // 3])


def draw(tokens: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  grid = base.square(tokens)
  return base.mark_wrong(base.cells_to_image(PALETTE[np.clip(grid, 0, len(PALETTE) - 1)], 6), grid, reference)


TASK = base.Task(name="generic", draw=draw)
