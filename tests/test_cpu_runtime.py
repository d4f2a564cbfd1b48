"""trm_jax.cpu_runtime: a step's temporary buffer is not page-faulted in again at every call.

Each case runs in a fresh interpreter: the settings are process-wide and
must come before jax makes its CPU client.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

import shared_paths

# A program whose temporary buffer (two [4096, 4096] float32 products, 64 MiB)
# is allocated at each call: the minor page faults per call (the median of 9
# calls) show whether that memory was already mapped. The median, because a
# call may still grow the heap once in a while (a small allocation between
# calls can split the freed block), which is not what this is about.
_PROGRAM = r"""
import json, resource, sys
from trm_jax import cpu_runtime
settings = cpu_runtime.configure(sys.argv[1] == "on")
import jax, jax.numpy as jnp
a, b = jnp.ones((4096, 16), jnp.float32), jnp.ones((16, 4096), jnp.float32)
compiled = jax.jit(lambda a, b: jnp.dot(a, b).T.sum(0) + jnp.dot(a, b).sum(0)).lower(a, b).compile()
temp = compiled.memory_analysis().temp_size_in_bytes
for _ in range(2):
  out = compiled(a, b).block_until_ready()
per_call = []
for _ in range(9):
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  out = compiled(a, b).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
print(json.dumps({"settings": settings, "temp_pages": temp / 4096, "faults_per_call": sorted(per_call)[4],
                  "async": jax.config.values["jax_cpu_enable_async_dispatch"], "sum": float(out.sum())}))
"""

_GLIBC_LINUX = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _run(mode: str) -> dict:
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as a CPU run has
  proc = subprocess.run([sys.executable, "-c", _PROGRAM, mode], cwd=shared_paths.REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _GLIBC_LINUX, reason="the malloc settings are glibc's")
def test_step_memory_stays_mapped_between_calls():
  on, off = _run("on"), _run("off")
  assert on["temp_pages"] >= 16384 and on["temp_pages"] == off["temp_pages"]  # 64 MiB, as intended
  assert on["settings"] == {"inline_dispatch": True, "keep_freed_memory": True}
  assert not on["async"]
  # Without the settings every call maps its temporary buffer in again (this
  # is what makes the test able to fail); with them, next to none of it.
  assert off["settings"] == {"inline_dispatch": False, "keep_freed_memory": False} and off["async"]
  assert off["faults_per_call"] > 0.75 * off["temp_pages"], off
  assert on["faults_per_call"] < 0.25 * on["temp_pages"], on
  assert on["sum"] == off["sum"]


def test_configure_after_the_first_computation_changes_nothing_it_cannot():
  code = ("import json, jax, jax.numpy as jnp\n"
          "jnp.ones(3).block_until_ready()\n"
          "from trm_jax import cpu_runtime\n"
          "print(json.dumps([cpu_runtime.configure(True), jax.config.values['jax_cpu_enable_async_dispatch']]))\n")
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=shared_paths.REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  settings, still_async = json.loads(proc.stdout.strip().splitlines()[-1])
  # The CPU client already dispatches asynchronously: the malloc settings
  # would not reach its threads' arenas, so none is applied.
  assert settings == {"inline_dispatch": False, "keep_freed_memory": False} and still_async


def test_a_run_applies_them_before_its_first_computation(tmp_path):
  # runs.setup is where launch.py and train_and_evaluate apply the settings:
  # nothing before that call in setup may start jax's backends.
  code = ("import json, sys\n"
          "from data_prep import sudoku\n"
          "from trm_jax import cpu_runtime, runs\n"
          "from trm_jax.configs import quickstart\n"
          "sudoku.build_generated(sys.argv[1] + '/data', num_train=4, num_test=4, num_aug=1, seed=0, target_clues=50)\n"
          "config = quickstart.get_config()\n"
          "config.data_path = sys.argv[1] + '/data'\n"
          "runs.setup(config, sys.argv[1] + '/run')\n"
          "print(json.dumps(cpu_runtime.configure(True)))\n")
  env = dict(os.environ, PYTHONPATH=str(shared_paths.REPO_ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=shared_paths.REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout.strip().splitlines()[-1])["inline_dispatch"] is True
