"""trm-jax: TRM, the Tiny Recursive Model, in JAX/Flax.

``kernels/`` and ``configs/`` sit beside ``trm_jax/`` in the repository (the
project's layout) but are installed as ``trm_jax.kernels`` and
``trm_jax.configs`` (``setup.cfg`` maps them), so that this project adds no
top-level module named like PyPI's ``kernels`` or ``configs``. When
``trm_jax`` is imported straight from a checkout (``PYTHONPATH``, a git
worktree), the finder below maps those two names to the folders beside this
package, so that a checkout always imports its own copy, never an installed
one.
"""

import importlib.abc
import importlib.util
import os
import sys

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT_DIR = os.path.dirname(_PACKAGE_DIR)
_BESIDE = ("kernels", "configs")


class _BesideFinder(importlib.abc.MetaPathFinder):
  """``trm_jax.kernels`` / ``trm_jax.configs`` -> the folders beside ``trm_jax/`` in a checkout."""

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    parent, _, name = fullname.rpartition(".")
    if parent != __name__ or name not in _BESIDE or os.path.isdir(os.path.join(_PACKAGE_DIR, name)):
      return None  # installed from a wheel: the subpackage is inside trm_jax/
    directory = os.path.join(_CHECKOUT_DIR, name)
    init = os.path.join(directory, "__init__.py")
    if not os.path.isfile(init):
      return None
    return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[directory])


if not any(isinstance(f, _BesideFinder) for f in sys.meta_path):
  sys.meta_path.insert(0, _BesideFinder())
