"""Shared test fixtures: where the golden numbers and the real data live."""
import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project is checked out beside ../shared (SPEC.md, golden/, data/).
SHARED_DIR = pathlib.Path(os.environ.get("TRM_SHARED_DIR", REPO_ROOT.parent / "shared"))
GOLDEN_DIR = SHARED_DIR / "golden"
DATA_DIR = SHARED_DIR / "data"

MODEL_GOLDEN_FILES = sorted(
    p for p in GOLDEN_DIR.glob("trm_*.npz")
) if GOLDEN_DIR.is_dir() else []


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
  if not GOLDEN_DIR.is_dir():
    raise FileNotFoundError(f"golden directory not found: {GOLDEN_DIR} (set TRM_SHARED_DIR)")
  return GOLDEN_DIR


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  if not DATA_DIR.is_dir():
    raise FileNotFoundError(f"data directory not found: {DATA_DIR} (set TRM_SHARED_DIR)")
  return DATA_DIR
