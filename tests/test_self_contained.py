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


def test_installed_names_are_namespaced():
  """setup.cfg installs trm_jax (with kernels/ and configs/ as trm_jax.kernels and trm_jax.configs) and
  data_prep, nothing else at the top level, and lists every subpackage (a new one would be left out of
  the wheel otherwise)."""
  import configparser  # pylint: disable=g-import-not-at-top
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  packages = set(cfg["options"]["packages"].split())
  package_dir = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
  assert package_dir == {"trm_jax.kernels": "kernels", "trm_jax.configs": "configs"}
  assert {p.split(".")[0] for p in packages} == {"trm_jax", "data_prep"}
  on_disk = set()
  for name, folder in [("trm_jax", "trm_jax"), ("data_prep", "data_prep"), *[(k, v) for k, v in package_dir.items()]]:
    for init in (ROOT / folder).rglob("__init__.py"):
      relative = init.parent.relative_to(ROOT / folder).parts
      on_disk.add(".".join((name, *relative)))
  assert packages == on_disk


def test_a_checkout_imports_its_own_kernels_and_configs(tmp_path):
  """From a checkout (PYTHONPATH), trm_jax.kernels / trm_jax.configs are the folders beside trm_jax/."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import trm_jax.kernels.swiglu as k, trm_jax.configs.default as c; print(k.__file__); print(c.__file__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}).stdout
  assert out.split() == [str(ROOT / "kernels" / "swiglu.py"), str(ROOT / "configs" / "default.py")]
