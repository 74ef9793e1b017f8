"""Shared fixtures: offline settings, the real datasets (embedded or from scanpy), a user's file."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def _tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (symlinks followed): what a test could change."""
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(scope="session")
def _documented_sft_run(tmp_path_factory) -> tuple[Path, dict[str, str], list[str]]:
    """The tiny SFT recipe run once per session exactly as the docs run it (``cellduality sft --config
    recipes/tiny-cpu/sft.yaml`` in a user's working folder): the folder, the digest of what it wrote,
    and the ids of tests found to have modified it."""
    import subprocess
    import sys

    cwd = tmp_path_factory.mktemp("documented_sft")
    (cwd / "recipes").symlink_to(REPO / "recipes")
    # every core, as a user runs one command (torch's default): the tests wait for this run alone
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        str(Path(sys.executable).parent / "cellduality"),
        "sft",
        "--config",
        "recipes/tiny-cpu/sft.yaml",
    ]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = cwd / "outputs" / "tiny-cpu" / "sft"
    assert (folder / "cellduality_run.json").is_file() and (folder / "model.safetensors").is_file()
    return folder, _tree_digest(folder), []


@pytest.fixture
def sft_checkpoint(_documented_sft_run, request) -> Iterator[Path]:
    """A trained SFT checkpoint to start from, shared read-only by the tests whose property does not
    depend on the SFT settings (one SFT run per session instead of one per test): the tiny SFT recipe's
    output (170 steps on pbmc68k's 64-cell SFT sets; GRPO from it gets varying rewards). A test that must
    write into it copies it to its ``tmp_path`` first. One that changes it fails at its teardown, naming
    the files, and every later test that asks for it fails at set-up instead of starting from it."""
    folder, digest, modified_by = _documented_sft_run
    if modified_by:
        pytest.fail(f"the shared SFT checkpoint {folder} was modified by {modified_by[0]}")
    yield folder
    changed = _changed(digest, _tree_digest(folder))
    if changed:
        modified_by.append(request.node.nodeid)
        pytest.fail(f"{request.node.nodeid} modified the shared SFT checkpoint {folder}: {changed[:10]}")
