"""Shared test fixtures: where the golden numbers and the real data live."""
import os
import pathlib

import pytest

from shared_paths import DATA_DIR, GOLDEN_DIR


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  return GOLDEN_DIR


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return DATA_DIR


def pytest_configure(config):
  """One persistent XLA compilation cache per test session.

  Several tests build the same jitted steps in fresh closures (a run, then its
  resume); the cache lets them reuse one compilation.
  """
  del config
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cache_dir = os.environ.get("TRM_TEST_COMPILATION_CACHE") or tempfile.mkdtemp(prefix="trm-jax-xla-cache-")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
