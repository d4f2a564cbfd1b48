"""The helpers shared by the kernels (kernels/__init__.py)."""

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
  assert kernels_lib.check_block("op", "b", 32) == 32
  for bad in (24, 8, 0, 16.0):
    with pytest.raises(ValueError, match="op: b must be a power of two >= 16"):
      kernels_lib.check_block("op", "b", bad)


def test_pad_axis():
  x = jnp.arange(6.0).reshape(2, 3)
  padded = kernels_lib.pad_axis(x, 1, 5)
  assert padded.shape == (2, 5)
  assert (padded[:, :3] == x).all() and (padded[:, 3:] == 0).all()
  assert kernels_lib.pad_axis(x, 0, 2) is x
