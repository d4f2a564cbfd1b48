"""Builds a run's dataset when it is missing (``config.data_build``).

The quickstart config uses this to make a small dataset on first run; every
other config points at a directory made by ``data_prep`` (see README). Only
process 0 builds; the others wait for it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from trm_jax.errors import UserError

BUILDERS = ("sudoku", "maze", "arc")


def build(kind: str, output_dir: pathlib.Path, args: dict[str, Any]) -> None:
  """Builds dataset ``kind`` into ``output_dir`` with the builder's keyword ``args``."""
  if kind == "sudoku":
    from data_prep import sudoku  # pylint: disable=g-import-not-at-top
    sudoku.build_generated(output_dir, **args)
  elif kind == "maze":
    from data_prep import maze  # pylint: disable=g-import-not-at-top
    maze.build_generated(output_dir, **args)
  elif kind == "arc":
    from data_prep import arc  # pylint: disable=g-import-not-at-top
    args = dict(args)
    prefix = args.pop("input_file_prefix", None) or arc.default_input_prefix()
    subsets = [arc.SubsetFiles.from_prefix(prefix, name)
               for name in args.pop("subsets", ("training", "evaluation", "concept"))]
    arc.build_arc_dataset(subsets, args.pop("test_set_name", "evaluation"), output_dir, **args)
  else:
    raise UserError(f"data_build={kind!r}: expected one of {BUILDERS}")


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
