"""The maze task (Maze-Hard): n x n grids of wall, open, start, goal and path tokens.

Holds what a run needs of mazes without ``data_prep``: the tokens, the
"valid and shortest path" check behind the ``maze`` evaluator (a prediction
is right when it marks any of the tied shortest paths, not only the label's),
and the drawing. ``data_prep.maze`` builds the datasets with the same BFS.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping

import numba
import numpy as np

from trm_jax.tasks import base

# Tokens: 0 padding, then the maze characters '# SGo'.
PAD, WALL, OPEN, START, GOAL, PATH = range(6)
VOCAB_SIZE = 6  # padding and the five maze tokens

# The fixed direction order of the path tie-break: up, down, left, right.
DIRS = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int64)


@numba.njit(cache=True, nogil=True)
def bfs(passable, n, source, dist, queue):
  """Distances (steps) from ``source`` over passable cells of an ``n x n`` grid; -1 unreachable."""
  dist[:] = -1
  dist[source] = 0
  queue[0] = source
  head = 0
  tail = 1
  while head < tail:
    c = queue[head]
    head += 1
    r = c // n
    k = c % n
    d = dist[c] + 1
    for j in range(4):
      rr = r + DIRS[j, 0]
      kk = k + DIRS[j, 1]
      if 0 <= rr < n and 0 <= kk < n:
        nb = rr * n + kk
        if passable[nb] and dist[nb] < 0:
          dist[nb] = d
          queue[tail] = nb
          tail += 1


@numba.njit(cache=True, nogil=True)
def _valid_shortest(inputs, preds, n, out):
  size = n * n
  passable = np.empty(size, np.uint8)
  dist = np.empty(size, np.int32)
  queue = np.empty(size, np.int64)
  for b in range(inputs.shape[0]):
    out[b] = False
    inp = inputs[b]
    pred = preds[b]
    start = -1
    goal = -1
    n_start = 0
    n_goal = 0
    ok = True
    for c in range(size):
      t = inp[c]
      if t == 3:
        start = c
        n_start += 1
      elif t == 4:
        goal = c
        n_goal += 1
      elif t != 1 and t != 2:
        ok = False  # Padding, a path token or garbage in the input.
    if not ok or n_start != 1 or n_goal != 1:
      continue
    # Shortest length over open cells.
    for c in range(size):
      passable[c] = 1 if inp[c] != 1 else 0
    bfs(passable, n, start, dist, queue)
    shortest = dist[goal]
    if shortest < 0:
      continue
    # The prediction: the input everywhere, except PATH on some open cells.
    n_path = 0
    for c in range(size):
      p = pred[c]
      if p == 5:
        if inp[c] != 2:
          ok = False
          break
        n_path += 1
      elif p != inp[c]:
        ok = False
        break
    if not ok or n_path != shortest - 1:
      continue
    # Reachable through marked cells only => a path of >= shortest steps whose
    # shortest-1 interior cells are all the marked ones: a shortest path.
    for c in range(size):
      passable[c] = 1 if (pred[c] == 5 or c == goal or c == start) else 0
    bfs(passable, n, start, dist, queue)
    out[b] = dist[goal] == shortest


def valid_shortest_path(inputs_BxS: np.ndarray, preds_BxS: np.ndarray,
                        grid_size: int) -> np.ndarray:
  """Whether each predicted maze solution is a valid shortest path (any of the ties).

  Args:
    inputs_BxS: ``[B, grid_size**2]`` input tokens (1 wall, 2 open, 3 start,
      4 goal), row by row.
    preds_BxS: ``[B, grid_size**2]`` predicted tokens (argmax of the logits).
    grid_size: ``n`` of the ``n x n`` grid.

  Returns:
    ``bool[B]``: true exactly when the prediction equals the input on every
    cell except some open cells marked 5 (path), and those marked cells are
    the interior of a 4-connected simple path from the start to the goal
    whose length (steps) is the BFS shortest length. So: walls, open cells,
    S and G predicted as themselves, nothing else marked, no gaps, no detour.
    Rows whose input is not a maze with exactly one S and one G (e.g. the
    padding rows of a last test batch, all 0) and mazes with no S->G path are
    False.
  """
  inputs = np.ascontiguousarray(inputs_BxS, np.int64)
  preds = np.ascontiguousarray(preds_BxS, np.int64)
  if inputs.ndim != 2 or inputs.shape != preds.shape or inputs.shape[1] != grid_size * grid_size:
    raise ValueError(f"valid_shortest_path: inputs and preds must both be [B, {grid_size}**2], "
                     f"got {inputs.shape} and {preds.shape}")
  out = np.zeros(inputs.shape[0], np.bool_)
  if inputs.shape[0]:
    _valid_shortest(inputs, preds, int(grid_size), out)
  return out


def shortest_path_lengths(inputs_BxS: np.ndarray, grid_size: int) -> np.ndarray:
  """BFS S->G distance (steps) per maze; -1 when unreachable or S/G missing."""
  inputs = np.asarray(inputs_BxS, np.int64).reshape(-1, grid_size * grid_size)
  out = np.full(inputs.shape[0], -1, np.int64)
  size = grid_size * grid_size
  dist = np.empty(size, np.int32)
  queue = np.empty(size, np.int64)
  for b, inp in enumerate(inputs):
    s, g = np.flatnonzero(inp == START), np.flatnonzero(inp == GOAL)
    if len(s) != 1 or len(g) != 1:
      continue
    bfs((inp != WALL).astype(np.uint8), grid_size, int(s[0]), dist, queue)
    out[b] = dist[g[0]]
  return out


# ---------------------------------------------------------------------------
# The evaluator and the drawing.


class MazeEvaluator:
  """Share of predicted paths that are valid and shortest (many shortest paths tie)."""

  def __init__(self, seq_len: int):
    self.grid_size = math.isqrt(seq_len)
    if self.grid_size ** 2 != seq_len:
      raise base.EvaluatorConfigError(f"evaluators: 'maze' needs square grids, but seq_len={seq_len}")
    self._counts: dict[str, list[int]] = {}

  def begin_eval(self) -> None:
    self._counts = {}

  def state(self) -> Any:
    return None

  def load_state(self, state: Any) -> None:
    del state

  def update(self, set_name: str, batch: Mapping[str, np.ndarray]) -> None:
    ok = valid_shortest_path(batch["inputs"], batch["preds"], self.grid_size)
    counts = self._counts.setdefault(set_name, [0, 0])
    counts[0] += int(np.sum(ok))
    counts[1] += int(ok.shape[0])

  def result(self, output_dir: pathlib.Path | None) -> dict[str, float]:
    del output_dir
    return {f"{s}/valid_shortest_accuracy": c / max(n, 1) for s, (c, n) in self._counts.items()}


def make_evaluator(settings: Mapping[str, Any], data_path: pathlib.Path, test_info: Any) -> MazeEvaluator:
  del settings, data_path
  return MazeEvaluator(test_info.metadata.seq_len)


EVALUATOR = base.EvaluatorType(name="maze", make=make_evaluator, defaults={})

# Padding, wall, open, start, goal, path.
COLOURS = np.array([[40, 40, 40], [30, 30, 30], [245, 245, 245], [46, 204, 64], [255, 65, 54],
                    [0, 116, 217]], np.uint8)


def draw(tokens: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
  grid = base.square(tokens)
  return base.mark_wrong(base.cells_to_image(COLOURS[np.clip(grid, 0, PATH)], 6), grid, reference)


TASK = base.Task(name="maze", draw=draw)
