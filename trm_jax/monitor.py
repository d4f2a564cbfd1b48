"""What a run shows while it trains: a progress line, TensorBoard scalars and images.

Only process 0 writes (``Monitor(enabled=jax.process_index() == 0)``); the
event files are flushed at every log step and evaluation, so TensorBoard shows
a live run: ``tensorboard --logdir <workdir>/tensorboard``.
"""

from __future__ import annotations

import pathlib
import sys
import time
from typing import Callable, Mapping, TextIO

import numpy as np


def prediction_panel(inputs: np.ndarray, preds: np.ndarray, labels: np.ndarray,
                     draw: Callable[..., np.ndarray]) -> np.ndarray:
  """Rows of ``input | prediction | target`` for a few samples, one RGB image.

  ``draw(tokens, reference=None)``: the task's drawing (``trm_jax.tasks``).
  """
  rows = []
  for x, p, y in zip(inputs, preds, labels):
    target = np.where(y < 0, 0, y)  # -100 (no label) drawn as padding
    tiles = [draw(x), draw(p, reference=np.where(y < 0, p, y)), draw(target)]
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
