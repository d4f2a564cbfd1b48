"""Where the tests find the inputs the project ships: puzzle files and golden numbers."""

import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The raw ARC JSON and Sudoku lists (xz-compressed; data_prep reads them as they are).
DATA_DIR = REPO_ROOT / "data_prep" / "raw"
# Numbers recorded from the original code (see golden/README.md there).
GOLDEN_DIR = REPO_ROOT / "tests" / "golden"

# TRM's cases and one file per other architecture of the original (arch_*.npz).
MODEL_GOLDEN_FILES = sorted(p for pattern in ("trm_*.npz", "arch_*.npz") for p in GOLDEN_DIR.glob(pattern))
