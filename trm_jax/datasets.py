"""Builds a run's dataset when it is missing (``config.data_build``), and runs the ``data_prep`` builders.

The quickstart config uses this to make a small dataset on first run; every
other config points at a directory made by ``data_prep`` (see README). Only
process 0 builds; the others wait for it.

This module is the one place ``trm_jax`` starts ``data_prep``, and it does so
as a subprocess (``python -m data_prep.<module>``): ``trm_jax`` never imports
``data_prep`` (``data_prep`` depends on ``trm_jax``, never the reverse), so a
run needs nothing of the builders but their command lines.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Callable, Sequence

import jax

from trm_jax.errors import UserError

BUILDERS = ("sudoku", "maze", "arc")
# The directory holding the trm_jax package: data_prep is its sibling in a checkout and in an install.
_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_builder(module: str, argv: Sequence[str], what: str, *,
                on_stderr: Callable[[str], None] | None = None) -> None:
  """Runs ``python -m <module> <argv>``; its stderr goes to ``on_stderr`` (line by line) or ours.

  A failing builder prints ``error: ...`` as its last error line; that line
  becomes the UserError, prefixed with ``what``.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  proc = subprocess.Popen([sys.executable, "-m", module, *argv], env=env, stderr=subprocess.PIPE, text=True)
  error = None
  for line in proc.stderr:
    if line.startswith("error: "):
      error = line[len("error: "):].strip()
    elif on_stderr is not None:
      on_stderr(line)
    else:
      sys.stderr.write(line)
      sys.stderr.flush()
  code = proc.wait()
  if code:
    raise UserError(f"{what}: {error or f'python -m {module} failed (exit status {code}), see above'}")


def build(kind: str, output_dir: pathlib.Path, args: dict[str, Any]) -> None:
  """Builds dataset ``kind`` into ``output_dir`` with the builder's keyword ``args`` (``data_prep.build``)."""
  if kind not in BUILDERS:
    raise UserError(f"data_build={kind!r}: expected one of {BUILDERS}")
  run_builder("data_prep.build", [kind, "--output-dir", str(output_dir), "--args", json.dumps(args)],
              f"data_build={kind!r} into {output_dir}")


def data_dirs(value: str, key: str) -> list[pathlib.Path]:
  """The directories a ``data_path``-like key names: one, or several separated by commas."""
  dirs = [pathlib.Path(part.strip()) for part in str(value).split(",") if part.strip()]
  if not dirs:
    raise UserError(f"config.{key} is empty: set it to a dataset directory built by data_prep "
                    "(or several, separated by commas)")
  return dirs


def ensure_dataset(config: Any) -> list[pathlib.Path]:
  """The directories of ``config.data_path``; a single missing one is built first by ``config.data_build``."""
  dirs = data_dirs(config.data_path, "data_path")
  if len(dirs) > 1 or dirs[0].exists() or not config.data_build:
    if len(dirs) > 1 and config.data_build and not all(d.exists() for d in dirs):
      raise UserError(f"data_build builds one directory, but data_path lists {len(dirs)}: build them with "
                      "data_prep first")
    return dirs
  path = dirs[0]
  if config.data_build not in BUILDERS:
    raise UserError(f"data_build={config.data_build!r}: expected one of {BUILDERS}")
  if jax.process_index() == 0:
    print(f"building the {config.data_build} dataset into {path} (data_build)", flush=True)
    build(config.data_build, path, dict(config.data_build_args.to_dict()))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("trm_jax.datasets.ensure_dataset")
  return dirs
