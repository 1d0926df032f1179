"""Shared fixtures: paths to the real datasets and ready-made databases.

Databases built here are session-scoped and read-only for tests: a test that writes
copies one first (``copy_db``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("POLYREC_DATASETS", ROOT.parent / "shared" / "datasets"))
ML100K = DATASETS / "ml-100k"
HM = DATASETS / "hm-sample"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    if not ML100K.exists():
        pytest.fail(f"MovieLens-100k not found at {ML100K} (set POLYREC_DATASETS)")
    return ML100K


@pytest.fixture(scope="session")
def hm_dir() -> Path:
    if not HM.exists():
        pytest.fail(f"H&M sample not found at {HM} (set POLYREC_DATASETS)")
    return HM


@pytest.fixture
def engine(tmp_path):
    """A fresh Engine over an empty SQLite file, built-in plugins only."""
    from engine import Engine
    with Engine(tmp_path / "t.db", device="cpu", entrypoints=False, progress=False) as eng:
        yield eng


def copy_db(src: Path, dst_dir: Path) -> Path:
    """Copy a SQLite database (checkpointed, so the copy is complete) for a test to write."""
    dst = dst_dir / src.name
    shutil.copyfile(src, dst)
    return dst
