#!/usr/bin/env bash
# Fills the git-ignored folders that a bare GPU machine needs for `python -m trm_jax.gpu_verdict`
# (docs/benchmarks.md, "GPU"); carry them with the device call: [".whl", ".orig"].
#
#   .whl     the wheels the GPU image lacks (SHARED/wheels/gpu-py312) and, if pip can get them,
#            pytest's (pytest, pluggy, iniconfig, pygments), so that tests/kernels runs there
#   .orig    the files of the original PyTorch code that its training step needs (models/, config/,
#            pretrain.py, LICENSE, README.md), from a checkout of SamsungSAILMontreal/TinyRecursiveModels,
#            with its commit in .orig/COMMIT; never committed here, never edited
#
# usage: tools/prepare_gpu_carry.sh ORIGINAL_CHECKOUT [SHARED_DIR]   (SHARED_DIR, of the wheels: ../shared beside the checkout)
# (the golden files ship in tests/golden)
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: tools/prepare_gpu_carry.sh ORIGINAL_CHECKOUT [SHARED_DIR]" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
orig=$(cd "$1" && pwd)
shared=${2:-$root/../shared}
for need in "$orig/models/recursive_reasoning/trm.py" "$shared/wheels/gpu-py312"; do
  if [[ ! -e $need ]]; then
    echo "error: $need not found" >&2
    exit 2
  fi
done
cd "$root"
rm -rf .whl .orig
mkdir -p .whl .orig

cp "$shared"/wheels/gpu-py312/*.whl .whl/
if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
    pytest pluggy iniconfig pygments; then
  echo "warning: no pytest wheels; the verdict will check the kernels without pytest" >&2
fi

if git -C "$orig" rev-parse --verify -q HEAD >/dev/null; then
  git -C "$orig" archive --format=tar HEAD models config pretrain.py LICENSE README.md | tar -x -C .orig
  git -C "$orig" rev-parse HEAD > .orig/COMMIT
else
  cp -r "$orig"/models "$orig"/config "$orig"/pretrain.py "$orig"/LICENSE "$orig"/README.md .orig/
  echo "unknown (copied from $orig, not a git checkout)" > .orig/COMMIT
fi

du -sh .whl .orig
