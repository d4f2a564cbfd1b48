"""Shared checks for the kernel tests (Pallas interpret mode on CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _assert_close(actual, expected, tol: float, what: str = "") -> None:
  """Same shape and dtype, finite, and close relative to the expected scale.

  Two measures, both relative to the reference: the Frobenius norm of the
  error (catches broad drift) and the largest elementwise error (catches a
  few wrong rows, such as a missing mask) against 8 * tol * max |expected|.
  """
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
  a = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
  e = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
  assert np.isfinite(a).all(), f"{what}: non-finite values"
  scale = np.abs(e).max()
  assert scale > 0, f"{what}: the reference is all zeros; the check would be vacuous"
  frob = np.linalg.norm(a - e) / np.linalg.norm(e)
  worst = np.abs(a - e).max() / scale
  assert frob <= tol and worst <= 8 * tol, (
      f"{what}: relative error {frob:.3g} (tol {tol:g}), max error {worst:.3g} of max |ref| "
      f"(tol {8 * tol:g})")


@pytest.fixture(scope="session")
def assert_close():
  return _assert_close


def linear_functional_grads(fn, args, argnums, key):
  """(output, grads of sum(output * w) w.r.t. args[argnums]) for a random w, jitted."""

  def loss(*args):
    out = fn(*args)
    w = jax.random.normal(key, out.shape, jnp.float32)
    return jnp.sum(out.astype(jnp.float32) * w), out

  # Full float32 dots on both sides: on a GPU, kernels and XLA would otherwise
  # both use TF32, rounded differently (no effect on a CPU).
  with jax.default_matmul_precision("highest"):
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
  return out, grads


@pytest.fixture(scope="session")
def value_and_grads():
  return linear_functional_grads
