"""Builds a dataset from a builder's keyword arguments: what ``config.data_build`` runs.

Usage: ``python -m data_prep.build <kind> --output-dir DIR [--args JSON]``
with ``kind`` one of ``BUILDERS`` and ``JSON`` the builder's keyword arguments
(``config.data_build_args``). ``trm_jax.datasets`` runs it as a subprocess, so
that ``trm_jax`` itself never imports ``data_prep``; the ``arc`` kind also
takes ``input_file_prefix``, ``subsets`` and ``test_set_name``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Sequence

from trm_jax import errors

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
    raise errors.UserError(f"data_build={kind!r}: expected one of {BUILDERS}")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_prep.build",
                              description="Build a dataset from a builder's keyword arguments (config.data_build).")
  p.add_argument("kind", help=f"one of {BUILDERS}")
  p.add_argument("--output-dir", required=True, help="dataset directory to create")
  p.add_argument("--args", default="{}", help="the builder's keyword arguments as a JSON object")
  a = p.parse_args(argv)
  try:
    try:
      kwargs = json.loads(a.args)
    except json.JSONDecodeError as e:
      raise errors.UserError(f"--args: invalid JSON ({e})") from None
    if not isinstance(kwargs, dict):
      raise errors.UserError(f"--args: expected a JSON object, got {a.args}")
    try:
      build(a.kind, pathlib.Path(a.output_dir), kwargs)
    except TypeError as e:  # an argument the builder does not take
      raise errors.UserError(f"data_build={a.kind!r}: data_build_args: {e}") from None
  except (errors.UserError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
