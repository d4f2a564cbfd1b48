"""The project needs nothing beside its checkout: the puzzle files, the golden
numbers and the spec it reads are shipped inside it, and no code looks for the
development setup's shared folder beside the checkout."""

import pathlib
import re

import shared_paths
from data_prep import arc
from data_prep import common
from data_prep import sudoku

ROOT = shared_paths.REPO_ROOT
# Ways code could reach outside the checkout for the development inputs.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "TRM_" + "SHARED_DIR", r"parent\s*/\s*[\"']" + "shared"]))


def _source_files():
  for folder in ("trm_jax", "kernels", "configs", "data_prep", "tests"):
    yield from (ROOT / folder).rglob("*.py")
  yield ROOT / "launch.py"
  yield ROOT / ".ci" / "run"


def test_no_code_reads_outside_the_checkout():
  offenders = [f"{p.relative_to(ROOT)}:{i}" for p in _source_files()
               for i, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
  assert not offenders


def test_the_default_inputs_are_shipped():
  prefix = arc.default_input_prefix()
  assert pathlib.Path(prefix).is_relative_to(ROOT)
  for subset in ("training", "evaluation", "training2", "evaluation2", "concept"):
    for kind in ("challenges", "solutions"):
      assert common.input_exists(f"{prefix}_{subset}_{kind}.json"), (subset, kind)
  assert len(sudoku.shipped_lists()) == 4
  goldens = {p.name for p in shared_paths.GOLDEN_DIR.glob("*.npz")}
  assert {"trm_attn_rope.npz", "trm_mlp_t.npz", "trm_attn_learned.npz", "adam_atan2.npz",
          "stablemax_ce.npz"} <= goldens
  assert (ROOT / "docs" / "SPEC.md").is_file()


def test_compressed_and_plain_inputs_read_alike(tmp_path):
  plain = tmp_path / "a_challenges.json"
  plain.write_text('{"x": 1}')
  assert common.input_path(plain) == plain
  missing = tmp_path / "b.json"
  assert common.input_path(missing) == missing and not common.input_exists(missing)
  import lzma  # pylint: disable=g-import-not-at-top
  with lzma.open(tmp_path / "b.json.xz", "wt") as f:
    f.write('{"y": 2}')
  assert common.input_exists(missing)
  with common.open_input(missing) as f:
    assert f.read() == '{"y": 2}'
