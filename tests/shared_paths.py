"""Where the project's shared inputs live: ../shared beside the checkout."""

import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project is checked out beside ../shared (SPEC.md, golden/, data/).
SHARED_DIR = pathlib.Path(os.environ.get("TRM_SHARED_DIR", REPO_ROOT.parent / "shared"))
GOLDEN_DIR = SHARED_DIR / "golden"
DATA_DIR = SHARED_DIR / "data"

# TRM's cases and one file per other architecture of the original (arch_*.npz).
MODEL_GOLDEN_FILES = sorted(
    p for pattern in ("trm_*.npz", "arch_*.npz") for p in GOLDEN_DIR.glob(pattern)
) if GOLDEN_DIR.is_dir() else []
