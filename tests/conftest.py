"""Shared fixtures: offline settings, the real datasets (embedded or from scanpy), a user's file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pbmc_file(tmp_path_factory) -> Path:
    """scanpy's pbmc68k_reduced (real, in the scanpy wheel) written as a user's .h5ad file."""
    import scanpy as sc

    path = tmp_path_factory.mktemp("user_files") / "pbmc68k_user.h5ad"
    sc.datasets.pbmc68k_reduced().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def pbmc():
    from cellduality.data import load_dataset

    return load_dataset("pbmc68k")


@pytest.fixture(scope="session")
def norman():
    from cellduality.data import load_dataset

    return load_dataset("norman_devel")
