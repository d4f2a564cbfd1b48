"""The Sudoku task: 81 cells, tokens 1 (blank) and 2..10 (digits 1..9), vocabulary 11.

Only the drawing is Sudoku's own: exact accuracy is the task's measure, and
the builders (``data_prep.sudoku``) hold the rest.
"""

from __future__ import annotations

import numpy as np

from trm_jax.tasks import base


def draw(tokens: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  """The board with its 3x3 boxes; with ``reference``, right digits green and wrong ones red."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  grid = np.asarray(tokens).astype(np.int64).reshape(9, 9)
  reference = None if reference is None else np.asarray(reference).reshape(9, 9)
  cell = 14
  image = Image.new("RGB", (9 * cell + 1, 9 * cell + 1), (255, 255, 255))
  draw_ = ImageDraw.Draw(image)
  for i in range(10):
    width = 2 if i % 3 == 0 else 1
    draw_.line([(0, i * cell), (9 * cell, i * cell)], fill=(0, 0, 0), width=width)
    draw_.line([(i * cell, 0), (i * cell, 9 * cell)], fill=(0, 0, 0), width=width)
  for r in range(9):
    for c in range(9):
      token = int(grid[r, c])
      if token >= 2:  # tokens 2..10 are digits 1..9; 1 is a blank
        colour = (0, 0, 0)
        if reference is not None:
          colour = (0, 130, 0) if int(reference[r, c]) == token else (220, 0, 0)
        draw_.text((c * cell + 4, r * cell + 1), str(token - 1), fill=colour)
  return np.asarray(image, np.uint8)


TASK = base.Task(name="sudoku", draw=draw)
