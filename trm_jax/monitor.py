"""What a run shows while it trains: a progress line, TensorBoard scalars and images.

Only process 0 writes (``Monitor(enabled=jax.process_index() == 0)``); the
event files are flushed at every log step and evaluation, so TensorBoard shows
a live run: ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import math
import pathlib
import sys
import time
from typing import Mapping, TextIO

import numpy as np

# The ARC palette (colours 0..9), as the ARC web viewer draws them.
ARC_COLOURS = np.array([
    [0, 0, 0], [0, 116, 217], [255, 65, 54], [46, 204, 64], [255, 220, 0],
    [170, 170, 170], [240, 18, 190], [255, 133, 27], [127, 219, 255], [135, 12, 37]], np.uint8)
PAD_COLOUR = np.array([40, 40, 40], np.uint8)
EOS_COLOUR = np.array([255, 255, 255], np.uint8)
# Maze tokens 1..5: wall, open, start, goal, path.
MAZE_COLOURS = np.array([[40, 40, 40], [30, 30, 30], [245, 245, 245], [46, 204, 64], [255, 65, 54],
                         [0, 116, 217]], np.uint8)


def grid_kind(seq_len: int, vocab_size: int) -> str:
  """How to draw a task's sequences: "arc", "sudoku", "maze" or a generic "grid"."""
  side = math.isqrt(seq_len)
  if seq_len == 900 and vocab_size == 12:
    return "arc"
  if seq_len == 81 and vocab_size == 11:
    return "sudoku"
  if vocab_size == 6 and side * side == seq_len:
    return "maze"
  return "grid"


def _cells_to_image(rgb_HxWx3: np.ndarray, cell: int) -> np.ndarray:
  """Each cell a ``cell``-pixel square with a 1-pixel dark border."""
  img = np.repeat(np.repeat(rgb_HxWx3, cell, axis=0), cell, axis=1)
  img[::cell, :] = img[::cell, :] // 2
  img[:, ::cell] = img[:, ::cell] // 2
  return img


def draw_tokens(tokens: np.ndarray, kind: str, reference: np.ndarray | None = None) -> np.ndarray:
  """One sequence of tokens as an RGB image (uint8 HxWx3).

  With ``reference`` (the target), wrong cells of a prediction are marked.
  """
  tokens = np.asarray(tokens).astype(np.int64)
  side = math.isqrt(tokens.size)
  if side * side != tokens.size:
    side_h, side_w = 1, tokens.size
  else:
    side_h = side_w = side
  grid = tokens.reshape(side_h, side_w)
  if kind == "arc":
    rgb = np.where((grid >= 2)[..., None], ARC_COLOURS[np.clip(grid - 2, 0, 9)],
                   np.where((grid == 1)[..., None], EOS_COLOUR, PAD_COLOUR))
    img = _cells_to_image(rgb.astype(np.uint8), 6)
  elif kind == "maze":
    img = _cells_to_image(MAZE_COLOURS[np.clip(grid, 0, 5)], 6)
  elif kind == "sudoku":
    return _draw_sudoku(grid, None if reference is None else np.asarray(reference).reshape(9, 9))
  else:
    palette = np.concatenate([ARC_COLOURS, ARC_COLOURS // 2, ARC_COLOURS // 3])
    img = _cells_to_image(palette[np.clip(grid, 0, len(palette) - 1)], 6)
  if reference is not None:
    wrong = np.asarray(reference).reshape(side_h, side_w) != grid
    wrong &= np.asarray(reference).reshape(side_h, side_w) >= 0
    cell = img.shape[0] // side_h
    for r, c in zip(*np.nonzero(wrong)):  # a red corner on every wrong cell
      img[r * cell:r * cell + 2, c * cell:c * cell + 2] = [255, 0, 0]
  return img


def _draw_sudoku(grid: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  cell = 14
  image = Image.new("RGB", (9 * cell + 1, 9 * cell + 1), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  for i in range(10):
    width = 2 if i % 3 == 0 else 1
    draw.line([(0, i * cell), (9 * cell, i * cell)], fill=(0, 0, 0), width=width)
    draw.line([(i * cell, 0), (i * cell, 9 * cell)], fill=(0, 0, 0), width=width)
  for r in range(9):
    for c in range(9):
      token = int(grid[r, c])
      if token >= 2:  # tokens 2..10 are digits 1..9; 1 is a blank
        colour = (0, 0, 0)
        if reference is not None:
          colour = (0, 130, 0) if int(reference[r, c]) == token else (220, 0, 0)
        draw.text((c * cell + 4, r * cell + 1), str(token - 1), fill=colour)
  return np.asarray(image, np.uint8)


def prediction_panel(inputs: np.ndarray, preds: np.ndarray, labels: np.ndarray, kind: str) -> np.ndarray:
  """Rows of ``input | prediction | target`` for a few samples, one RGB image."""
  rows = []
  for x, p, y in zip(inputs, preds, labels):
    target = np.where(y < 0, 0, y)  # -100 (no label) drawn as padding
    tiles = [draw_tokens(x, kind), draw_tokens(p, kind, reference=np.where(y < 0, p, y)),
             draw_tokens(target, kind)]
    height = max(t.shape[0] for t in tiles)
    gap = np.full((height, 4, 3), 255, np.uint8)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
    rows.append(np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
  return np.concatenate(rows, axis=0)


class Monitor:
  """Progress line + TensorBoard (tensorboardX) for one run."""

  def __init__(self, workdir: str | pathlib.Path, *, total_steps: int, enabled: bool = True,
               tensorboard: bool = True, stream: TextIO | None = None):
    self.enabled = enabled
    self.total_steps = total_steps
    self.stream = stream or sys.stdout
    self.writer = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"), flush_secs=30)
    self._last_time: float | None = None
    self._last_step: int | None = None
    self._start_step: int | None = None
    self._start_time: float | None = None

  def rate(self, step: int) -> float | None:
    """Steps per second since the previous call or evaluation; None for the
    first call (its steps include compilation: no rate to show yet)."""
    now = time.perf_counter()
    if self._last_time is None:
      self._start_time, self._start_step = now, step
      rate = None
    else:
      rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_time, self._last_step = now, step
    return rate

  def resume(self, step: int) -> None:
    """Training resumes at ``step`` after an evaluation or a save: the next rate
    counts from now, and the ETA leaves the pause out."""
    if self._last_time is not None:
      now = time.perf_counter()
      if self._start_time is not None:
        self._start_time += now - self._last_time
      self._last_time, self._last_step = now, step

  def eta(self, step: int) -> str:
    if self._start_time is None or step <= self._start_step:
      return "?"
    per_step = (time.perf_counter() - self._start_time) / (step - self._start_step)
    seconds = int(per_step * max(self.total_steps - step, 0))
    hours, rem = divmod(seconds, 3600)
    return f"{hours}h{rem // 60:02d}m" if hours else f"{rem // 60}m{rem % 60:02d}s"

  def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
    """One progress line and the train scalars (``metrics`` already on the host)."""
    if not self.enabled:
      return
    rate = self.rate(step)
    fields = [f"step {step}/{self.total_steps}"]
    for key, fmt in (("lm_loss", ".4f"), ("accuracy", ".3f"), ("exact_accuracy", ".3f"), ("steps", ".2f"),
                     ("lr", ".2e")):
      if key in metrics:
        fields.append(f"{key} {metrics[key]:{fmt}}")
    if rate is not None:
      fields.append(f"{rate:.2f} steps/s, ETA {self.eta(step)}")
    print(" | ".join(fields), file=self.stream, flush=True)
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(f"train/{k}", v, step)
      if rate is not None:
        self.writer.add_scalar("train/steps_per_second", rate, step)
      self.writer.flush()

  def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)))
    print(f"eval @ step {step}: {shown}", file=self.stream, flush=True)
    if self.writer is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)):
          self.writer.add_scalar(f"eval/{k}", v, step)
      self.writer.flush()

  def log_images(self, step: int, tag: str, panel_HxWx3: np.ndarray) -> None:
    if self.enabled and self.writer is not None:
      self.writer.add_image(tag, panel_HxWx3, step, dataformats="HWC")
      self.writer.flush()

  def print(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.stream, flush=True)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
