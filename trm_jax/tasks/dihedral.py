"""Grid symmetries shared by the builders and the evaluators.

Dihedral transform ids (SPEC §7): 0 identity, 1 rot90, 2 rot180, 3 rot270,
4 flip left-right, 5 flip up-down, 6 transpose, 7 anti-transpose (flip-lr of
rot90). ``rot90`` is numpy's (counter-clockwise).
"""

import numpy as np

NUM_DIHEDRAL = 8
# DIHEDRAL_INVERSE[k] undoes transform k.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


def dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
  """Applies dihedral transform ``tid`` to the last two axes of ``grid``."""
  axes = (-2, -1)
  if tid == 0:
    return grid
  if tid in (1, 2, 3):
    return np.rot90(grid, k=tid, axes=axes)
  if tid == 4:
    return np.flip(grid, axis=-1)
  if tid == 5:
    return np.flip(grid, axis=-2)
  if tid == 6:
    return np.swapaxes(grid, -2, -1)
  if tid == 7:
    return np.flip(np.rot90(grid, k=1, axes=axes), axis=-1)
  raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")


def inverse_dihedral_transform(grid: np.ndarray, tid: int) -> np.ndarray:
  if not 0 <= tid < NUM_DIHEDRAL:
    raise ValueError(f"dihedral transform id must be in 0..7, got {tid}")
  return dihedral_transform(grid, DIHEDRAL_INVERSE[tid])
