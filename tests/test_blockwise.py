"""The block-wise ``prepare`` of an .h5ad file gives the rows and meta of the in-memory path, exactly.

Every embedded dataset is written to a real .h5ad file and prepared both ways: read whole
(``load_dataset`` + ``build_tasks``) and block by block (``prepare_blockwise``, blocks of 97 cells so
that no block boundary lines up with anything). Rows are compared one by one, and ``meta.json`` key by
key (the block-wise one only adds ``streaming``: how it was read).
"""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellduality.data import EMBEDDED, Columns, DataError, load_dataset
from cellduality.tasks import TaskConfig, build_tasks
from cellduality.tasks.blockwise import prepare_blockwise


@pytest.fixture(scope="module")
def embedded_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("embedded_h5ad")
    out = {}
    for name, entry in EMBEDDED.items():
        path = folder / f"{name}.h5ad"
        entry.read().write_h5ad(path)
        out[name] = path
    return out


def _rows(dd) -> dict[str, list[dict]]:
    return {split: ds.to_list() for split, ds in dd.items()}


def _same(path: Path, columns: Columns, out: Path, *, allow_scaled=None, block_cells=97, workers=1, **kw):
    whole = build_tasks(load_dataset(path, columns, allow_scaled=allow_scaled), **kw)
    blocks = prepare_blockwise(
        path,
        columns,
        out,
        allow_scaled=allow_scaled,
        block_cells=block_cells,
        workers=workers,
        progress=False,
        **kw,
    )
    assert list(blocks.datasets) == list(whole.datasets)
    a, b = _rows(whole.datasets), _rows(blocks.datasets)
    for split in a:
        assert len(a[split]) == len(b[split]) > 0
        for i, (x, y) in enumerate(zip(a[split], b[split], strict=True)):
            assert x == y, f"{split} row {i} differs"
    written = json.loads((out / "meta.json").read_text())
    streaming = written.pop("streaming")
    assert streaming["block_cells"] == block_cells
    assert written.pop("tables") == []
    expected = json.loads(json.dumps(whole.meta))
    assert list(written) == list(expected)
    for key in expected:
        assert written[key] == expected[key], key
    return blocks


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_blockwise_equals_in_memory_on_every_embedded_dataset(name, embedded_files, tmp_path) -> None:
    entry = EMBEDDED[name]
    _same(embedded_files[name], entry.columns, tmp_path / "out", allow_scaled=entry.allow_scaled or None)


def test_blockwise_equals_in_memory_ood_capped_and_two_workers(embedded_files, tmp_path) -> None:
    columns = EMBEDDED["norman_devel"].columns
    _same(
        embedded_files["norman_devel"],
        columns,
        tmp_path / "out",
        workers=2,
        split="ood",
        config=TaskConfig(top_k=30, n_genes=40, max_examples=300, seed=3),
    )


def _counts_file(path: Path, *, dense: bool = False, csc: bool = False) -> Path:
    """Raw counts with what the first pass must find: empty cells (two of them only in a column that
    is dropped), two columns of one symbol, an unmappable Ensembl ID, labels with a missing value."""
    rng = np.random.default_rng(5)
    n, g = 410, 60
    x = rng.poisson(0.6, size=(n, g)).astype(np.float32)
    x[:, 8] += 3  # the duplicate of column 7 with more expression: kept
    x[[3, 200, 401]] = 0  # empty cells
    x[[50, 51], :] = 0
    x[[50, 51], 7] = 4  # expressed only in the column that loses to its duplicate: empty after dedupe
    genes = [f"ENSG{1000 + j:011d}" for j in range(g)]
    symbols = [f"GENE{j}" for j in range(g)]
    symbols[8] = "gene7"  # case-insensitively the same symbol as column 7
    symbols[9] = ""  # no symbol: dropped
    obs = pd.DataFrame(
        {"ct": rng.choice(["a", "b", "c"], size=n).astype(object)}, index=[f"c{i}" for i in range(n)]
    )
    obs.iloc[10, 0] = None
    matrix = x if dense else (sp.csc_matrix(x) if csc else sp.csr_matrix(x))
    ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame({"feature_name": symbols}, index=genes)).write_h5ad(path)
    return path


@pytest.mark.parametrize("dense", [False, True])
def test_blockwise_counts_duplicates_empty_cells(dense, tmp_path) -> None:
    path = _counts_file(tmp_path / "counts.h5ad", dense=dense)
    prepared = _same(path, Columns(cell_type="ct"), tmp_path / "out", block_cells=64)
    notes = " | ".join(prepared.meta["notes"])
    assert "raw counts" in notes and "duplicate gene symbols" in notes
    assert "dropped 5 cells with no expressed gene" in notes
    assert (
        prepared.meta["streaming"]["passes"] >= 3
    )  # values, totals of the duplicates, empty cells, sentences


def test_csc_file_refused_with_the_fix(tmp_path) -> None:
    path = _counts_file(tmp_path / "csc.h5ad", csc=True)
    with pytest.raises(DataError, match=r"CSC.*tocsr\(\).*--in-memory"):
        prepare_blockwise(path, Columns(cell_type="ct"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from cellduality.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's one-line errors
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_blockwise_progress_and_in_memory_same_folder(capsys, tmp_path) -> None:
    path = _counts_file(tmp_path / "counts.h5ad")
    base = ["prepare", "--dataset", str(path), "--cell-type-col", "ct", "--top-k", "12"]
    code, out, err = _cli(capsys, *base, "--out", str(tmp_path / "b"), "--block-cells", "50")
    assert code == 0, err
    assert "cell sentences" in err and "0.00/410" in err  # the bar's opening state, whatever the timing
    assert "saved to" in out
    code, _, err = _cli(capsys, *base, "--out", str(tmp_path / "m"), "--in-memory")
    assert code == 0 and "cell sentences" not in err
    from datasets import load_from_disk

    a, b = load_from_disk(str(tmp_path / "b" / "data")), load_from_disk(str(tmp_path / "m" / "data"))
    assert {s: d.to_list() for s, d in a.items()} == {s: d.to_list() for s, d in b.items()}


def test_cli_bad_file_is_one_line_before_any_bar(capsys, tmp_path) -> None:
    path = _counts_file(tmp_path / "csc.h5ad", csc=True)
    code, out, err = _cli(capsys, "prepare", "--dataset", str(path), "--cell-type-col", "ct", "--out", "o")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "CSC" in err
    path = _counts_file(tmp_path / "ok.h5ad")
    code, out, err = _cli(capsys, "prepare", "--dataset", str(path), "--cell-type-col", "nope", "--out", "o")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "'nope'" in err and "ct" in err  # the columns that exist
    code, _, err = _cli(
        capsys, "prepare", "--dataset", str(path), "--cell-type-col", "ct", "--out", "o", "--block-cells", "0"
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--block-cells" in err


def test_cli_blockwise_path_problems_are_the_in_memory_messages(capsys, tmp_path) -> None:
    folder = tmp_path / "cells.h5ad"  # a folder with an .h5ad name
    folder.mkdir()
    damaged = tmp_path / "damaged.h5ad"
    damaged.write_bytes(b"not an HDF5 file")
    cases = [
        (tmp_path / "missing.h5ad", "no such file"),
        (folder, "is a folder, not an .h5ad file"),
        (damaged, "could not be read as .h5ad"),
    ]
    for path, needle in cases:
        code, out, err = _cli(
            capsys, "prepare", "--dataset", str(path), "--cell-type-col", "ct", "--out", "o"
        )
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err


def test_cli_prepare_refuses_to_replace_a_prepared_folder(capsys, tmp_path) -> None:
    """A second `prepare` into the same --out is refused (one line, nothing touched) unless --overwrite; a
    folder whose data/ is not a prepared dataset's is refused even with it."""
    path = _counts_file(tmp_path / "counts.h5ad")
    out = tmp_path / "prepared"
    base = ["prepare", "--dataset", str(path), "--cell-type-col", "ct", "--top-k", "12", "--out", str(out)]
    code, _, err = _cli(capsys, *base)
    assert code == 0, err
    meta = (out / "meta.json").read_bytes()
    for extra in ([], ["--in-memory"]):
        code, printed, err = _cli(capsys, *base, *extra, "--top-k", "8")
        assert code == 2 and printed == "" and len(err.strip().splitlines()) == 1, err
        assert (
            f"{out} already holds a prepared dataset (meta.json); give another --out, or --overwrite" in err
        )
    assert (out / "meta.json").read_bytes() == meta
    code, printed, err = _cli(capsys, *base, "--top-k", "8", "--overwrite")
    assert code == 0 and "saved to" in printed, err
    assert (out / "meta.json").read_bytes() != meta
    theirs = tmp_path / "project"
    (theirs / "data").mkdir(parents=True)
    (theirs / "data" / "notes.txt").write_text("mine")
    code, _, err = _cli(capsys, *base[:-1], str(theirs), "--overwrite")
    assert code == 2 and "is not part of a prepared dataset" in err
    assert sorted(p.name for p in (theirs / "data").iterdir()) == ["notes.txt"]


def test_value_blocks_reuse_one_buffer_and_scan_as_fresh_reads(tmp_path) -> None:
    """The first pass reads each block's values into one buffer: every block (longer and shorter ones,
    empty rows, an empty block) holds exactly the values a fresh read gives, and the scan's verdicts
    (extremes, empty cells) are those of the whole matrix."""
    from cellduality.data.backed import H5adFile
    from cellduality.data.streaming import _scan

    rng = np.random.default_rng(1)
    x = sp.random(300, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng)
    x = x.tolil()
    x[50:80] = 0  # a block of 10 empty cells among longer rows
    x[7, 3] = -0.5
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    path = tmp_path / "values.h5ad"
    ad.AnnData(X=x, var=pd.DataFrame(index=[f"G{j}" for j in range(40)])).write_h5ad(path)
    with H5adFile(path) as file:
        matrix = file.matrix()
        seen, buffers = [], set()
        for start, stop, values in matrix.value_blocks(10):
            lo, hi = x.indptr[start], x.indptr[stop]
            assert np.array_equal(values, x.data[lo:hi]) and values.dtype == np.float32
            seen.append((start, stop))
            buffers.add(values.base is not None and id(values.base))
        assert seen == list(matrix.blocks(10)) and len(buffers) == 1  # one buffer for all 30 blocks
        scan, positive = _scan(matrix, 10, True)
    assert (scan.minimum, scan.maximum, scan.n_values) == (-0.5, x.data.max(), x.nnz)
    assert positive.tolist() == (x.max(axis=1).toarray().ravel() > 0).tolist()
    assert not positive[50:80].any() and positive.sum() > 200
