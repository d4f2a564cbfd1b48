r"""Trains, evaluates or predicts with TRM.

  python launch.py --config=configs/arc.py --workdir=runs/arc1
  python launch.py --config=configs/sudoku.py:att --config.lr=3e-4 --workdir=runs/sudoku_att
  python launch.py --config=configs/arc.py --workdir=runs/arc1 --mode=eval
  python launch.py --config=configs/arc.py --workdir=runs/arc1 --mode=predict \
      --input=arc-agi_test_challenges.json --output=submission.json
  python launch.py --config=configs/arc.py --workdir=runs/arc1 --mode=export --output=weights.npz

Re-running a train command with the same --workdir resumes the run.
"""

import logging
import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

# Config paths are found from the working directory first, then from this
# checkout, so that `python path/to/launch.py` works from any directory.
HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS


def resolve_config_paths(argv: list[str]) -> list[str]:
  """``--config=configs/x.py[:arg]``: a path missing from the working directory
  is taken from this checkout when it exists there."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      i, value, prefix = i + 1, out[i + 1], ""
    elif arg.startswith("--config="):
      value, prefix = arg[len("--config="):], "--config="
    else:
      continue
    path, sep, variant = value.partition(":")
    if path and not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(HERE, path)):
      out[i] = prefix + os.path.join(HERE, path) + sep + variant
  return out


if __name__ == "__main__":
  # Before the config flag is defined: defining it reads the file and its overrides.
  sys.argv[:] = resolve_config_paths(sys.argv)


def _one_line(error: BaseException) -> str:
  """An ml_collections / absl error as one line (they hold repr'd KeyErrors and whole tracebacks)."""
  while len(error.args) == 1 and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = str(error.args[0]) if len(error.args) == 1 else str(error)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errno_line = [line for line in lines if line.startswith("[Errno")]
  if errno_line:
    return f"cannot load the config file: {errno_line[-1]}"
  if "Traceback (most recent call last)" in text:
    lines = lines[-1:]  # the config file's own error
  return "; ".join(lines)


def _config_error(error: BaseException) -> None:
  prefix = "--config: unknown key " if isinstance(error, (AttributeError, KeyError)) else "--config: "
  print(f"error: {prefix}{_one_line(error)}", file=sys.stderr)
  sys.exit(2)


try:
  # Reads --config.<key> overrides from sys.argv already: a mistyped key fails here.
  config_flags.DEFINE_config_file(
      "config", os.path.join(HERE, "configs", "quickstart.py"),
      "Config file, optionally with a variant: configs/x.py[:arg] (relative to the working directory or to "
      "this checkout).", lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as _e:
  _config_error(_e)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, TensorBoard, outputs). "
                    "Default: runs/<config name>[_<variant>].")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                  "train (or resume); eval a checkpoint; predict an ARC challenges file; export a "
                  "checkpoint's weights in the original's naming (.npz).")
flags.DEFINE_string("checkpoint", "latest", "eval/predict: 'latest', 'best' or a step number.")
flags.DEFINE_string("input", None, "predict: an ARC challenges JSON (arc-agi_<subset>_challenges.json).")
flags.DEFINE_string("output", None, "predict: where to write submission.json "
                    "(default <workdir>/predict/submission.json); export: the .npz to write "
                    "(default <workdir>/export/weights_step_<step>.npz).")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (or set by the cluster).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

class _NoOrbaxTracebacks(logging.Filter):
  """Orbax logs a failed background save with tracebacks (hundreds of lines) before the error
  reaches the trainer, which reports it in one line naming the directory and the cause."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and "orbax" in record.pathname)


def _quiet_closed_event_loop(hook):
  """After a failed save, TensorStore still completes the save's other writes and calls back into
  the event loop Orbax has closed: each prints a traceback (sys.unraisablehook). Dropped; the
  failure itself is reported in one line."""
  def unraisablehook(unraisable):
    if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)
  return unraisablehook


if __name__ != "__main__":
  # grain's worker processes re-import this module as __mp_main__ and may read
  # flags: they must not find them unparsed.
  FLAGS.mark_as_parsed()


def default_workdir(config_arg: str) -> str:
  path, _, variant = config_arg.partition(":")
  name = path.rsplit("/", 1)[-1].removesuffix(".py")
  return f"runs/{name}_{variant}" if variant else f"runs/{name}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, but a bad --config file or key is one line and exit status 2, not a traceback."""
  try:
    rest = FLAGS(argv)
    _ = FLAGS.config.is_locked  # a config file that failed to load raises here
  except flags.Error as e:
    if isinstance(e.__context__, (AttributeError, KeyError)):
      _config_error(e.__context__)
    print(f"error: {_one_line(e)}", file=sys.stderr)
    sys.exit(2)
  except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
    _config_error(e)
  return rest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    # Orbax and absl log hundreds of INFO lines per run; the progress lines are
    # printed, not logged. --verbosity=0 (or 1) shows the logs again.
    absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").addFilter(_NoOrbaxTracebacks())
  sys.unraisablehook = _quiet_closed_event_loop(sys.unraisablehook)
  # pylint: disable=g-import-not-at-top
  from trm_jax import errors, inference, runs, train
  # pylint: enable=g-import-not-at-top
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  try:
    runs.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if FLAGS.mode == "train":
      train.train_and_evaluate(FLAGS.config, workdir)
    elif FLAGS.mode == "eval":
      inference.evaluate_checkpoint(FLAGS.config, workdir, checkpoint=FLAGS.checkpoint)
    elif FLAGS.mode == "export":
      inference.export_weights(FLAGS.config, workdir, FLAGS.output, checkpoint=FLAGS.checkpoint)
    else:
      if not FLAGS.input:
        raise errors.UserError("--mode=predict needs --input=<ARC challenges JSON>")
      inference.predict(FLAGS.config, workdir, FLAGS.input, FLAGS.output, checkpoint=FLAGS.checkpoint)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
