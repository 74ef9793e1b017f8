"""Data layer on real files: loading, normalisation, gene IDs, validation errors, splits."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellduality.data import EMBEDDED, Columns, DataError, load_dataset, prepare_anndata, split_cells
from cellduality.data.embedded import resource_path


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_datasets_load(name: str) -> None:
    data = load_dataset(name)
    x = data.adata.X
    assert sp.issparse(x) and x.dtype == np.float32
    assert data.adata.var_names.is_unique and data.adata.n_obs > 50
    assert np.isfinite(x.data).all()
    if data.value_type == "log-normalised":
        assert x.data.min() >= 0 and x.data.max() < 20  # log scale
    for task in data.columns.supported_tasks():
        data.columns.require(task, data.adata.obs.columns)


def test_pbmc_uses_raw_not_scaled(pbmc) -> None:
    assert any(".raw" in n for n in pbmc.notes)
    assert pbmc.adata.X.data.min() > 0


def test_glioblastoma_counts_normalised_and_ensembl_mapped() -> None:
    data = load_dataset("glioblastoma_panobinostat")
    assert any("raw counts" in n for n in data.notes)
    # normalised over all 300 genes of the file, then the one unmapped gene is dropped: each cell's
    # kept genes sum to at most 10,000, and to exactly what normalising by hand gives
    raw = EMBEDDED["glioblastoma_panobinostat"].read()
    counts = raw.X[:20].toarray()
    by_hand = counts / counts.sum(axis=1, keepdims=True) * 1e4
    symbol_of = dict(zip(raw.var_names, raw.var["gene_symbol"].astype(str), strict=True))
    cols = [list(raw.var_names).index(e) for e in raw.var_names if symbol_of[e] in set(data.genes)]
    sums = np.expm1(data.adata.X[:20].toarray()).sum(axis=1)
    assert np.allclose(sums, by_hand[:, cols].sum(axis=1), rtol=1e-3)
    # the file carries its own symbol column: our offline mapping must agree with it
    raw = EMBEDDED["glioblastoma_panobinostat"].read()
    given = set(raw.var["gene_symbol"].dropna().astype(str))
    assert len(set(data.genes) & given) >= 0.95 * len(data.genes)


def test_scad_entrez_mapped_and_zscores_flagged() -> None:
    data = load_dataset("scad_plx4720")
    assert data.value_type == "z-score"
    raw = EMBEDDED["scad_plx4720"].read()
    assert len(set(data.genes) & set(raw.var["gene_symbol"].astype(str))) >= 0.95 * len(data.genes)
    with pytest.raises(DataError, match="scaled"):
        load_dataset("scad_plx4720", allow_scaled=False)


def test_user_h5ad_raw_counts() -> None:
    # the embedded glioblastoma file read as a user's file: raw UMI counts, Ensembl IDs + a symbol column
    path = resource_path("glioblastoma_panobinostat.h5ad")
    data = load_dataset(
        path, Columns(perturbation="condition", control_value="ctrl", perturbation_kind="chemical")
    )
    assert any("raw counts" in n for n in data.notes)
    assert any("var['gene_symbol']" in n for n in data.notes)  # found and named, not guessed silently
    assert data.columns.supported_tasks() == ["perturbation"]


def test_missing_column_names_existing_columns(pbmc_file) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(pbmc_file, Columns(cell_type="cell_type")).columns.require(
            "annotation", ["phase", "bulk_labels"]
        )
    assert "bulk_labels" in str(err.value) and "phase" in str(err.value)


def test_no_columns_for_a_file_is_refused(pbmc_file) -> None:
    with pytest.raises(DataError, match="columns that exist"):
        load_dataset(pbmc_file)


def _toy(x, genes=None, obs=None) -> ad.AnnData:
    genes = genes or [f"G{j}" for j in range(np.asarray(x).shape[1])]
    n = np.asarray(x).shape[0]  # two classes: a single one is refused (cellduality.data.labels)
    obs = obs if obs is not None else pd.DataFrame({"ct": ["a", "b"] * (n // 2) + ["a"] * (n % 2)})
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(X=np.asarray(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=genes))


def test_scaled_without_raw_refused_with_fix() -> None:
    with pytest.raises(DataError, match=r"\.raw"):
        prepare_anndata(_toy([[1.0, -0.5], [0.2, 0.3]]), Columns(cell_type="ct"))


def test_nan_and_inf_refused() -> None:
    with pytest.raises(DataError, match="NaN"):
        prepare_anndata(_toy([[1.0, np.nan], [0.2, 0.3]]), Columns(cell_type="ct"))
    with pytest.raises(DataError, match="NaN or infinite"):
        prepare_anndata(_toy([[1.0, np.inf], [0.2, 0.3]]), Columns(cell_type="ct"))


def test_empty_cells_dropped_and_counted() -> None:
    data = prepare_anndata(_toy([[0.0, 0.0], [0.2, 0.3], [0.0, 0.0]]), Columns(cell_type="ct"))
    assert data.n_empty_dropped == 2 and data.adata.n_obs == 1
    assert any("dropped 2" in n for n in data.notes)


def test_duplicate_symbols_keep_most_expressed() -> None:
    data = prepare_anndata(
        _toy([[0.1, 2.0, 0.3], [0.1, 2.0, 0.3]], genes=["CD3E", "cd3e", "LYZ"]), Columns(cell_type="ct")
    )
    assert data.genes == ["cd3e", "LYZ"]
    assert any("duplicate" in n for n in data.notes)


def test_unmappable_ids_refused() -> None:
    genes = [f"ENSG{9_000_000_000 + j:011d}" for j in range(10)]
    with pytest.raises(DataError, match="--gene-symbols"):
        prepare_anndata(_toy(np.ones((2, 10)), genes=genes), Columns(cell_type="ct"))


def test_gene_symbol_column() -> None:
    adata = ad.read_h5ad(resource_path("glioblastoma_panobinostat.h5ad"))
    data = prepare_anndata(
        adata, Columns(perturbation="condition", control_value="ctrl"), gene_symbols="gene_symbol"
    )
    assert "SPP1" in data.genes
    with pytest.raises(DataError, match="gene_id"):
        prepare_anndata(adata, Columns(perturbation="condition"), gene_symbols="nope")


def test_id_split_is_seeded_partition(pbmc) -> None:
    s1 = split_cells(pbmc.adata.obs, mode="id", seed=0)
    s2 = split_cells(pbmc.adata.obs, mode="id", seed=0)
    assert np.array_equal(s1.test, s2.test)
    assert len(np.intersect1d(s1.train, s1.test)) == 0
    assert len(s1.train) + len(s1.test) == pbmc.adata.n_obs


def test_ood_split_no_leak(norman) -> None:
    obs = norman.adata.obs
    s = split_cells(obs, mode="ood", key="perturbation", seed=0, control_value="control")
    train_values = set(obs["perturbation"].iloc[s.train])
    test_values = set(obs["perturbation"].iloc[s.test]) - {"control"}
    assert s.holdout and test_values == set(s.holdout)
    assert not (train_values & set(s.holdout))
    assert "control" in train_values and "control" in set(obs["perturbation"].iloc[s.test])


def test_ood_split_needs_two_values() -> None:
    data = load_dataset("scad_plx4720")
    with pytest.raises(DataError, match="--split id"):
        split_cells(data.adata.obs, mode="ood", key="drug")


def _finite_range_by_mask(values):
    """The definition: the mask of finite values, its count, then the extremes of what it keeps."""
    finite = np.isfinite(values)
    kept = values[finite]
    if kept.size == 0:
        return int((~finite).sum()), np.inf, -np.inf
    return int((~finite).sum()), float(kept.min()), float(kept.max())


@pytest.mark.parametrize(
    "values",
    [
        [],
        [0.0, 1.0, 2.5],
        [-3.0, 0.0, 7.0],
        [np.nan, 1.0, 2.0],
        [np.inf, 1.0, -2.0],
        [-np.inf, 4.0],
        [np.nan, np.inf, -np.inf],
        [np.nan],
        [-0.0, 0.0],
    ],
)
@pytest.mark.parametrize("threads_from", [4_000_000, 1])  # the one-thread path, and halves on threads
def test_finite_range_is_the_masked_definition(values, threads_from, monkeypatch):
    from cellduality.data import loading
    from cellduality.data.loading import finite_range

    monkeypatch.setattr(loading, "_PARALLEL_VALUES", threads_from)
    array = np.asarray(values, dtype=np.float32)
    assert finite_range(array) == _finite_range_by_mask(array)
    rng = np.random.default_rng(len(values))  # the same inside a large random block
    big = rng.normal(size=10_000).astype(np.float32)
    big[rng.choice(big.size, size=len(values), replace=False)] = array
    assert finite_range(big) == _finite_range_by_mask(big)


@pytest.mark.parametrize(
    "blocks",
    [
        [[0.0, 1.0], [1.0, 1.0]],
        [[0.0, 1.0], [0.5]],
        [[0.0, 1.0, np.nan], [1.0]],
        [[2.0, 3.0], [0.0, 1.0]],
        [[np.nan, np.inf]],
    ],
)
def test_first_pass_scan_matches_the_mask_definition(blocks):
    """``_Scan`` (streamed prepare's first pass) skips its 0/1 comparison for blocks outside [0, 1];
    its counts, extremes and 0/1 verdict are those of the whole matrix's finite values."""
    from cellduality.data.streaming import _Scan

    scan = _Scan()
    for block in blocks:
        scan.add(np.asarray(block, dtype=np.float32))
    everything = np.concatenate([np.asarray(b, dtype=np.float32) for b in blocks])
    n_bad, lo, hi = _finite_range_by_mask(everything)
    finite = everything[np.isfinite(everything)]
    assert (scan.n_bad, scan.minimum, scan.maximum) == (n_bad, lo, hi)
    assert scan.binary == bool(np.isin(finite, (0.0, 1.0)).all())


def _scanpy_normalised(x: sp.csr_matrix) -> sp.csr_matrix:
    import scanpy as sc

    tmp = ad.AnnData(sp.csr_matrix(x, dtype=np.float32))
    sc.pp.normalize_total(tmp, target_sum=1e4)
    sc.pp.log1p(tmp)
    return sp.csr_matrix(tmp.X)


def _same_bits(a: sp.csr_matrix, b: sp.csr_matrix) -> bool:
    return (
        a.shape == b.shape
        and a.data.dtype == b.data.dtype == np.float32
        and np.array_equal(a.indptr, b.indptr)
        and np.array_equal(a.indices, b.indices)
        and a.data.tobytes() == b.data.tobytes()
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_normalisation_is_scanpys_bit_for_bit(seed):
    """Random count blocks with empty rows, long rows (float64 sums whose order matters) and
    unsorted column indices: every value has scanpy's exact bits."""
    from cellduality.data.normalise import normalise_counts

    rng = np.random.default_rng(seed)
    n_cells, n_genes = 300, 5000
    density = rng.uniform(0.001, 0.4, size=n_cells)[:, None]
    dense = (rng.random((n_cells, n_genes)) < density) * rng.geometric(0.05, (n_cells, n_genes))
    dense = dense * rng.choice([1.0, 0.37], size=(n_cells, 1))  # whole counts, and values whose sum rounds
    dense[::17] = 0  # empty cells
    x = sp.csr_matrix(dense.astype(np.float32))
    order = rng.permutation(x.indices.size)  # unsorted indices within rows keep storage order
    for i in range(n_cells):
        lo, hi = x.indptr[i], x.indptr[i + 1]
        seg = lo + np.argsort(order[lo:hi])
        x.indices[lo:hi], x.data[lo:hi] = x.indices[seg], x.data[seg]
    x.has_sorted_indices = False
    assert _same_bits(normalise_counts(x), _scanpy_normalised(x))


def test_streamed_normalisation_of_real_counts(pbmc_file):
    from cellduality.data.normalise import normalise_counts

    raw = ad.read_h5ad(pbmc_file).raw.X  # log-normalised values: any non-negative values will do
    block = sp.csr_matrix(np.expm1(raw.toarray() if sp.issparse(raw) else raw) * 7.3)
    assert _same_bits(normalise_counts(block), _scanpy_normalised(block))
