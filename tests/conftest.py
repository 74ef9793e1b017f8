"""Shared fixtures: offline settings, the real datasets, a temporary prepared folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's offline real-data folder (../shared/data), present on every dev and CI machine."""
    if not SHARED_DATA.exists():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pbmc():
    from cellduality.data import load_dataset

    return load_dataset("pbmc68k")


@pytest.fixture(scope="session")
def norman():
    from cellduality.data import load_dataset

    return load_dataset("norman_devel")
