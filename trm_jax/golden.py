r"""Checks this implementation against numbers from the original code.

    python -m trm_jax.golden FILE.npz [FILE ...] [--kernels=pallas]

Any file of the golden format (``tests/golden/README.md``) works: model
files (``config_json`` + ``param/*`` + eval/train/trajectory entries) for any
configuration that format can express and any architecture (``"arch"`` in
``config_json``, default ``trm``; the carry under the original's field names), ``adam_atan2``-style optimiser files
(``hparams_json`` + ``param<t>``/``grad<t>``) and ``stablemax_ce``-style loss
files. One line per file gives the worst relative error (max abs error / max
abs value) per quantity; the exit status is non-zero when a tolerance is
exceeded or a file cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from trm_jax import act
from trm_jax import errors
from trm_jax import losses
from trm_jax import models
from trm_jax import optim
from trm_jax import weights

# Tolerances of the golden README (relative: max abs error / max abs value).
TOL_VALUES = 1e-4  # logits, q values, carry, losses, float metrics
TOL_GRADS = 1e-3  # per gradient tensor
BF16_FACTOR, BF16_SLACK = 2.0, 1e-2  # ours <= 2 * original's own bf16 drift + 1e-2
COUNT_METRICS = ("count", "exact_accuracy", "q_halt_accuracy", "steps")


class GoldenFormatError(errors.UserError, ValueError):
  """A golden file lacks a key or holds a wrong shape."""


def relative_error(ours: Any, ref: Any) -> float:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    return float("inf")
  scale = np.abs(ref).max() if ref.size else 0.0
  err = np.abs(ours - ref).max() if ref.size else 0.0
  return float(err / scale) if scale > 0 else float(err)


class GoldenFile:
  """Key access that names the file and key on a missing key or wrong shape."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    try:
      self._data = np.load(self.path, allow_pickle=False)
    except FileNotFoundError:
      raise GoldenFormatError(f"{self.path}: no such file") from None
    except Exception as e:  # zip/npz parsing errors
      raise GoldenFormatError(f"{self.path}: not a readable .npz file ({e})") from None
    self.keys = set(self._data.files)

  @property
  def data(self) -> Any:
    """The underlying npz mapping."""
    return self._data

  def __contains__(self, key: str) -> bool:
    return key in self.keys

  def get(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in self.keys:
      raise GoldenFormatError(f"{self.path.name}: missing key {key!r}")
    value = self._data[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
      raise GoldenFormatError(f"{self.path.name}: key {key!r} has shape {list(value.shape)}, "
                              f"expected {list(shape)}")
    return value

  def steps(self, prefix: str) -> list[int]:
    """The sorted t of every ``<prefix>/<t>/...`` key."""
    found = {int(m.group(1)) for k in self.keys if (m := re.match(rf"{re.escape(prefix)}/(\d+)/", k))}
    return sorted(found)


@dataclasses.dataclass
class Report:
  """Worst errors per quantity and the tolerance each must meet."""
  errors: dict[str, float] = dataclasses.field(default_factory=dict)
  limits: dict[str, float] = dataclasses.field(default_factory=dict)
  mismatches: list[str] = dataclasses.field(default_factory=list)

  def add(self, quantity: str, error: float, limit: float) -> None:
    self.errors[quantity] = max(self.errors.get(quantity, 0.0), error)
    self.limits[quantity] = limit

  def exact(self, what: str, ours: Any, ref: Any) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape or not np.array_equal(ours, ref):
      self.mismatches.append(what)

  @property
  def failures(self) -> list[str]:
    bad = [f"{q}={e:.2e}>{self.limits[q]:.1e}" for q, e in self.errors.items()
           if not e <= self.limits[q]]
    return bad + [f"{m} differs" for m in self.mismatches]

  @property
  def ok(self) -> bool:
    return not self.failures

  def line(self, name: str) -> str:
    parts = " ".join(f"{q}={e:.1e}" + (f"(<={self.limits[q]:.1e})" if self.limits[q] not in (TOL_VALUES, TOL_GRADS) else "")
                     for q, e in self.errors.items())
    status = "OK" if self.ok else "FAIL (" + ", ".join(self.failures) + ")"
    return f"{name}: {status} {parts}"


# ---------------------------------------------------------------------------
# Model files.


def _batch(golden: GoldenFile, prefix: str, config: models.ModelConfig, batch_size: int) -> dict[str, jax.Array]:
  s = config.seq_len
  return {
      "inputs": jnp.asarray(golden.get(f"{prefix}inputs", (batch_size, s)), jnp.int32),
      "labels": jnp.asarray(golden.get(f"{prefix}labels", (batch_size, s)), jnp.int32),
      "puzzle_identifiers": jnp.asarray(golden.get(f"{prefix}puzzle_identifiers", (batch_size,)), jnp.int32),
  }


def _check_metrics(report: Report, where: str, metrics: dict[str, Any], golden: GoldenFile, prefix: str,
                   group: str) -> None:
  for key in sorted(k for k in golden.keys if k.startswith(prefix + "metric/")):
    name = key[len(prefix + "metric/"):]
    if name not in metrics:
      report.mismatches.append(f"{where} metric {name} (not computed)")
      continue
    if name in COUNT_METRICS:
      report.exact(f"{where} metric/{name}", int(metrics[name]), int(golden.get(key)))
    else:
      report.add(f"{group}.metrics", relative_error(metrics[name], golden.get(key)), TOL_VALUES)


def check_model_file(golden: GoldenFile, kernels: str = "xla") -> Report:
  """Every check of a model golden file (see the module docstring)."""
  config_dict = json.loads(str(golden.get("config_json")))
  try:
    config = models.config_from_dict({**config_dict, "kernels": kernels}, source=f"{golden.path.name}:config_json")
  except ValueError as e:
    raise GoldenFormatError(f"{golden.path.name}: config_json: {e}") from None
  if "batch_size" not in config_dict:
    raise GoldenFormatError(f"{golden.path.name}: config_json lacks 'batch_size'")
  batch_size = int(config_dict["batch_size"])
  # The trajectories in the files were recorded with exploration off.
  config = dataclasses.replace(config, halt_exploration_prob=0.0)
  state = {k[len("param/"):]: golden.get(k) for k in golden.keys if k.startswith("param/")}
  try:
    params, table = weights.import_state_dict(config, state, source=golden.path.name)
  except ValueError as e:
    raise GoldenFormatError(str(e)) from None
  report = Report()
  b, s, v = batch_size, config.seq_len, config.vocab_size
  sp, d = config.num_positions, config.hidden_size
  batch = _batch(golden, "batch/", config, b)

  with jax.default_matmul_precision("highest"):
    # --- eval trajectory: the same batch every call, from the initial carry.
    eval_call = jax.jit(lambda p, t, c, x: losses.act_call(config, p, t, c, x, train=False))
    carry = act.initial_carry(config, batch)
    eval_steps = golden.steps("eval")
    if not eval_steps:
      raise GoldenFormatError(f"{golden.path.name}: missing key 'eval/0/logits'")
    for t in eval_steps:
      g = f"eval/{t}/"
      carry, loss, metrics, out = eval_call(params, table, carry, batch)
      report.add("eval.logits", relative_error(out["logits"], golden.get(g + "logits", (b, s, v))), TOL_VALUES)
      report.add("eval.q", relative_error(out["q_halt_logits"], golden.get(g + "q_halt_logits", (b,))), TOL_VALUES)
      report.add("eval.q", relative_error(out["q_continue_logits"], golden.get(g + "q_continue_logits", (b,))),
                 TOL_VALUES)
      for name, z in carry.latents.items():  # under the original's field names
        report.add("eval.carry", relative_error(z, golden.get(g + name, (b, sp, d))), TOL_VALUES)
      recorded = sorted(k[len(g):] for k in golden.keys if k.startswith(g + "z_"))
      report.exact(f"eval/{t} carry fields {recorded}", sorted(carry.latents), recorded)
      report.add("eval.loss", relative_error(loss, golden.get(g + "loss")), TOL_VALUES)
      report.exact(f"eval/{t}/halted", carry.halted, golden.get(g + "halted", (b,)))
      report.exact(f"eval/{t}/steps", carry.steps, golden.get(g + "steps", (b,)))
      _check_metrics(report, f"eval/{t}", metrics, golden, g, "eval")

    # --- train mode, first call: loss, metrics and every gradient.
    def train_loss(p, rows, c):
      return losses.act_loss(config, p, rows, c, train=True)

    @jax.jit
    def train_grads(p, tbl, c, x):
      c = act.reset_carry(config, p, c, x)
      rows = losses.gather_puzzle_rows(config, tbl, c)
      (loss, (_, metrics, _)), grads = jax.value_and_grad(train_loss, argnums=(0, 1), has_aux=True)(p, rows, c)
      return loss, metrics, grads, c.current_data["puzzle_identifiers"]

    loss, metrics, (grads, row_grads), row_ids = train_grads(params, table, act.initial_carry(config, batch), batch)
    report.add("train0.loss", relative_error(loss, golden.get("train0/loss")), TOL_VALUES)
    _check_metrics(report, "train0", metrics, golden, "train0/", "train0")
    grads_by_name = weights.export_state_dict(config, grads, None)  # the original's names and layout
    for name in weights.trainable_original_names(config):
      ours = grads_by_name[name]
      ref = golden.get(f"grad/{name}")
      if ref.shape != ours.shape:
        raise GoldenFormatError(f"{golden.path.name}: key 'grad/{name}' has shape {list(ref.shape)}, "
                                f"expected {list(ours.shape)}")
      report.add("grad", relative_error(ours, ref), TOL_GRADS)
    if config.puzzle_emb_ndim:
      report.add("grad.puzzle_emb", relative_error(
          row_grads, golden.get("grad/puzzle_emb_local", (b, config.puzzle_emb_ndim))), TOL_GRADS)
      report.exact("train0 puzzle ids", row_ids, batch["puzzle_identifiers"])
    last_train_ids = row_ids

    # --- train-mode trajectory: a new batch at every call.
    train_call = jax.jit(lambda p, t, c, x: losses.act_call(config, p, t, c, x, train=True))
    carry = act.initial_carry(config, batch)
    for t in golden.steps("traj"):
      g = f"traj/{t}/"
      carry, loss, metrics, out = train_call(params, table, carry, _batch(golden, g + "batch/", config, b))
      report.exact(f"traj/{t}/halted", carry.halted, golden.get(g + "halted", (b,)))
      report.exact(f"traj/{t}/steps", carry.steps, golden.get(g + "steps", (b,)))
      report.exact(f"traj/{t}/current_inputs", carry.current_data["inputs"],
                   golden.get(g + "current_inputs", (b, s)))
      report.add("traj.q", relative_error(out["q_halt_logits"], golden.get(g + "q_halt_logits", (b,))), TOL_VALUES)
      report.add("traj.loss", relative_error(loss, golden.get(g + "loss")), TOL_VALUES)
      _check_metrics(report, f"traj/{t}", metrics, golden, g, "traj")
      last_train_ids = carry.current_data["puzzle_identifiers"]
    if config.puzzle_emb_ndim:
      # The original's sparse embedding keeps the ids of its LAST training
      # forward in a buffer (``local_ids``), and the golden files read that
      # buffer after recording the trajectory: so these are the ids of the last
      # train-mode call, not of train0 (whose rows are the batch's, checked above).
      report.exact("grad/puzzle_emb_local_ids", last_train_ids,
                   golden.get("grad/puzzle_emb_local_ids", (b,)))

    # --- bfloat16 at step 0: no further from float32 than the original's own drift allows.
    if "eval_bf16/0/logits" in golden:
      bf16 = dataclasses.replace(config, forward_dtype="bfloat16")
      _, _, _, out = jax.jit(lambda p, t, c, x: losses.act_call(bf16, p, t, c, x, train=False))(
          params, table, act.initial_carry(bf16, batch), batch)
      ref32 = golden.get("eval/0/logits", (b, s, v))
      limit = BF16_FACTOR * relative_error(golden.get("eval_bf16/0/logits", (b, s, v)), ref32) + BF16_SLACK
      report.add("bf16.logits", relative_error(np.asarray(out["logits"], np.float32), ref32), limit)
  return report


# ---------------------------------------------------------------------------
# Optimiser and loss files.


def check_stablemax_file(golden: GoldenFile) -> Report:
  logits = golden.get("logits")
  if logits.ndim != 3:
    raise GoldenFormatError(f"{golden.path.name}: key 'logits' must be [B, S, V], has shape {list(logits.shape)}")
  labels = golden.get("labels", logits.shape[:2])
  ref = golden.get("loss", logits.shape[:2])
  report = Report()
  ours = losses.stablemax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
  report.add("loss", relative_error(ours, ref), TOL_VALUES)
  return report


def check_adam_atan2_file(golden: GoldenFile) -> Report:
  """The project's AdamATan2 replayed on the file's steps, in float64 and float32."""
  report = Report()
  for dtype, limit in optim.ADAM_ATAN2_GOLDEN_TOLERANCE.items():
    try:
      errors = optim.check_adam_atan2_golden(golden.data, dtype=dtype)
    except ValueError as e:
      raise GoldenFormatError(f"{golden.path.name}: {e}") from None
    report.add(f"params.{dtype}", max(errors.values()), limit)
  return report


CHECKERS: list[tuple[str, Callable[..., Report]]] = [
    ("config_json", check_model_file),
    ("hparams_json", check_adam_atan2_file),
    ("logits", check_stablemax_file),
]


def check_file(path: str | pathlib.Path, kernels: str = "xla") -> Report:
  golden = GoldenFile(path)
  if "config_json" in golden:
    return check_model_file(golden, kernels=kernels)
  for key, checker in CHECKERS[1:]:
    if key in golden:
      return checker(golden)
  raise GoldenFormatError(f"{golden.path.name}: not a golden file (expected 'config_json', 'hparams_json' "
                          f"or 'logits'; found {sorted(golden.keys)[:5]})")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m trm_jax.golden", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("files", nargs="+", help="golden .npz files")
  parser.add_argument("--kernels", default="xla", choices=("xla", "pallas"),
                      help="implementation of the hot-path ops (pallas runs in interpret mode on a CPU)")
  args = parser.parse_args(argv)
  failed = False
  for path in args.files:
    try:
      report = check_file(path, kernels=args.kernels)
    except (GoldenFormatError, ValueError) as e:
      print(f"{pathlib.Path(path).name}: ERROR {e}")
      failed = True
      continue
    print(report.line(pathlib.Path(path).name), flush=True)
    failed |= not report.ok
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
