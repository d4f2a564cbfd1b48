"""The helpers shared by the kernels (kernels/__init__.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from trm_jax import kernels as kernels_lib


@pytest.mark.parametrize("backend, expected", [("cpu", True), ("gpu", False), ("tpu", False)])
def test_interpret_defaults_to_cpu_only(monkeypatch, backend, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert kernels_lib.resolve_interpret(None) is expected
  assert kernels_lib.resolve_interpret(True) is True
  assert kernels_lib.resolve_interpret(False) is False


def test_block_rules():
  assert ([kernels_lib.next_power_of_2(n) for n in (1, 2, 3, 97, 128, 916)]
          == [1, 2, 4, 128, 128, 1024])
  assert kernels_lib.round_up(916, 64) == 960
  assert kernels_lib.fit_block(64, 10) == 16  # never below the dot minimum
  assert kernels_lib.fit_block(64, 40) == 64
  assert kernels_lib.fit_block(128, 97) == 128


@dataclasses.dataclass(frozen=True)
class _Sizes(kernels_lib.BlockSizes):
  block: int = kernels_lib.tile(32)
  rows: int = kernels_lib.tile(0, minimum=1, auto=True)
  num_warps: int = kernels_lib.warps(4)
  num_stages: int = kernels_lib.stages(2)
  impl: str = kernels_lib.choice("a", ("a", "b"))


@pytest.mark.parametrize("field, bad, expected", [
    ("block", 24, "a power of two >= 16"), ("block", 8, "a power of two >= 16"),
    ("block", 0, "a power of two >= 16"), ("block", 16.0, "a power of two >= 16"),
    ("block", True, "a power of two >= 16"), ("rows", 3, r"a power of two >= 1 or 0 \(automatic\)"),
    ("rows", -1, r"a power of two >= 1 or 0 \(automatic\)"), ("num_warps", 6, "a power of two >= 1"),
    ("num_stages", 0, "a positive integer"), ("num_stages", "2", "a positive integer"),
    ("impl", "c", r"one of \('a', 'b'\)"),
])
def test_block_sizes_reject_bad_values_naming_the_field(field, bad, expected):
  with pytest.raises(kernels_lib.BlockSizeError, match=rf"^_Sizes\.{field}={bad!r}: expected {expected}$"):
    _Sizes(**{field: bad})
  # from_dict names the value by the caller's key (a config's), on one line.
  with pytest.raises(ValueError, match=rf"^config\.x\.{field}={bad!r}: expected {expected}$"):
    _Sizes.from_dict({field: bad}, "config.x")


def test_block_sizes_defaults_dicts_and_unknown_keys():
  sizes = _Sizes.from_dict({"block": 64, "rows": 0, "num_warps": 1, "impl": "b"})
  assert sizes == _Sizes(block=64, rows=0, num_warps=1, impl="b") and hash(sizes) == hash(_Sizes(**sizes.to_dict()))
  assert _Sizes.from_dict({}) == _Sizes()
  with pytest.raises(ValueError, match=r"^config\.x: unknown key\(s\) \['blok'\]; expected some of"):
    _Sizes.from_dict({"blok": 64}, "config.x")


def test_pad_axis():
  x = jnp.arange(6.0).reshape(2, 3)
  padded = kernels_lib.pad_axis(x, 1, 5)
  assert padded.shape == (2, 5)
  assert (padded[:, :3] == x).all() and (padded[:, 3:] == 0).all()
  assert kernels_lib.pad_axis(x, 0, 2) is x
