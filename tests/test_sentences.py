"""Cell sentence contract: order, seeded ties, top-k, sparse = dense, inverse fit."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellduality.sentences import (
    cell_sentences,
    fit_rank_expression,
    sentence_to_expression,
    sentences_to_matrix,
    top_gene_indices,
)


def _adata(x) -> ad.AnnData:
    genes = [f"G{j}" for j in range(x.shape[1])]
    return ad.AnnData(X=x, var=pd.DataFrame(index=genes))


def test_order_and_expressed_only() -> None:
    x = np.array([[0.0, 3.0, 1.0, 2.0], [0.0, 0.0, 0.0, 5.0]], dtype=np.float32)
    assert cell_sentences(_adata(x)) == [["G1", "G3", "G2"], ["G3"]]
    assert cell_sentences(_adata(x), top_k=2) == [["G1", "G3"], ["G3"]]


def test_sparse_equals_dense_and_naive_reference() -> None:
    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, size=(300, 120)).astype(np.float32)  # many ties
    a = cell_sentences(_adata(dense), top_k=30, seed=3)
    b = cell_sentences(_adata(sp.csr_matrix(dense)), top_k=30, seed=3)
    assert a == b
    for i in range(300):
        values = dense[i]
        got = [int(g[1:]) for g in a[i]]
        assert all(values[j] > 0 for j in got)
        assert list(values[got]) == sorted(values[got], reverse=True)
        expected_len = min(30, int((values > 0).sum()))
        assert len(got) == expected_len
        # the k-th value bounds everything left out
        if got:
            left_out = np.setdiff1d(np.flatnonzero(values > 0), got)
            assert (values[left_out] <= values[got[-1]]).all()


def test_ties_seeded_and_deterministic() -> None:
    x = np.ones((1, 50), dtype=np.float32)
    s0 = cell_sentences(_adata(x), seed=0)
    assert s0 == cell_sentences(_adata(x), seed=0)
    assert s0 != cell_sentences(_adata(x), seed=1)
    assert sorted(s0[0]) == sorted(f"G{j}" for j in range(50))


def test_empty_rows_and_bad_k() -> None:
    x = sp.csr_matrix(np.zeros((3, 4), dtype=np.float32))
    assert cell_sentences(_adata(x)) == [[], [], []]
    with pytest.raises(ValueError):
        top_gene_indices(np.ones((2, 2)), top_k=0)


def test_real_data_matches_raw_ranking(pbmc) -> None:
    sentences = cell_sentences(pbmc.adata, top_k=50)
    raw = pbmc.adata.X[0].toarray().ravel()
    genes = list(pbmc.adata.var_names)
    first = [raw[genes.index(g)] for g in sentences[0]]
    assert first == sorted(first, reverse=True) and len(first) == 50


def test_inverse_fit(pbmc) -> None:
    fit = fit_rank_expression(pbmc.adata)
    assert fit.slope < 0 and 0.5 < fit.r2 <= 1.0
    genes = list(pbmc.adata.var_names)
    vec = sentence_to_expression(["cd74", "FTL", "NOT_A_GENE", "CD74"], genes, fit)
    assert vec[genes.index("CD74")] == pytest.approx(fit.intercept)  # rank 1: log10(1) = 0
    assert vec[genes.index("FTL")] == pytest.approx(max(0.0, fit.slope * np.log10(2) + fit.intercept))
    assert np.count_nonzero(vec) == 2
    m = sentences_to_matrix([["FTL"], []], genes, fit)
    assert m.shape == (2, len(genes)) and m[1].sum() == 0
    # reconstructed expression correlates with the measured expression of the same cell
    s = cell_sentences(pbmc.adata, top_k=100)[0]
    measured = pbmc.adata.X[0].toarray().ravel()
    recon = sentence_to_expression(s, genes, fit)
    idx = [genes.index(g) for g in s]
    assert np.corrcoef(measured[idx], recon[idx])[0, 1] > 0.8


@pytest.mark.parametrize("k", [1, 7, 50, None])
def test_compiled_top_k_matches_numpy_reference(k) -> None:
    """The numba kernel and the vectorised numpy version pick the same genes in the same order, ties
    (few distinct values), explicit zeros and negative values (z-scores) included."""
    from cellduality.sentences import _block_sparse, _block_sparse_numpy, _csr_rows, _TieOrder

    rng = np.random.default_rng(3)
    x = sp.random(300, 400, density=0.1, format="csr", random_state=4, dtype=np.float32)
    x.data = rng.integers(-2, 5, size=x.nnz).astype(np.float32)  # negatives, zeros, many ties
    x.data[::17] = 0.5
    order = _TieOrder.from_seed(11)
    got, got_n = _block_sparse(_csr_rows(x, 0, 300), k, order)
    ref, ref_n = _block_sparse_numpy(_csr_rows(x, 0, 300), k, order)
    assert np.array_equal(got_n, ref_n) and got_n.max() > 0
    width = int(ref_n.max())
    assert np.array_equal(got[:, :width], ref[:, :width])


@pytest.mark.parametrize("k", [1, 20, 100, 200])
def test_compiled_top_k_cuts_long_rows_by_a_sampled_threshold(k) -> None:
    """Rows of hundreds to thousands of non-zeros, where the kernel first cuts by a threshold sampled
    along the row: the same genes in the same order as the numpy version, with count-like ties at the
    threshold, non-expressed values, and rows whose sample overshoots (every sampled position holds
    the row's largest value, too few others reach it: the full row is read instead)."""
    from cellduality.sentences import _block_sparse, _block_sparse_numpy, _csr_rows, _TieOrder

    rng = np.random.default_rng(8)
    x = sp.random(120, 6000, density=0.25, format="csr", random_state=9, dtype=np.float32)
    x.data = np.log1p(rng.geometric(0.35, size=x.nnz)).astype(np.float32)  # few distinct values
    x.data[rng.random(x.nnz) < 0.05] = -1.0
    x.data[rng.random(x.nnz) < 0.02] = 0.0
    for row in (3, 50):  # a skewed sample: 64 evenly spaced entries hold the only high values
        lo, hi = x.indptr[row], x.indptr[row + 1]
        x.data[lo:hi] = 0.5
        x.data[lo : lo + (hi - lo) // 64 * 64 : (hi - lo) // 64] = 9.0
    order = _TieOrder.from_seed(5)
    got, got_n = _block_sparse(_csr_rows(x, 0, 120), k, order)
    ref, ref_n = _block_sparse_numpy(_csr_rows(x, 0, 120), k, order)
    assert np.array_equal(got_n, ref_n) and got_n.min() == k
    assert np.array_equal(got[:, :k], ref[:, :k])


@pytest.mark.parametrize("top_k", [None, 3, 40])
@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_cell_sentences_written_in_place_match_the_per_cell_indices(top_k, layout):
    """Blocks write their rows into one array (a sparse block straight from the compiled kernel): over
    several blocks, with stored zeros, negative values and empty cells, every sentence is the
    per-cell ranking, and the array is as wide as the longest sentence (at most top_k)."""

    from cellduality.sentences import _BLOCK_CELLS, cell_sentences, top_gene_indices

    rng = np.random.default_rng(top_k or 0)
    n_cells, n_genes = 2 * _BLOCK_CELLS + 37, 60
    dense = np.where(rng.random((n_cells, n_genes)) < 0.3, rng.integers(-3, 9, (n_cells, n_genes)), 0)
    dense[::50] = 0
    x = dense.astype(np.float32)
    matrix = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](x)
    if layout == "csr":
        matrix.data[::7] = 0  # stored zeros are not expressed
    names = [f"G{j}" for j in range(n_genes)]
    adata = ad.AnnData(X=matrix, var=pd.DataFrame(index=names))
    sentences = cell_sentences(adata, top_k=top_k, seed=3, allow_scaled=True)
    expected = top_gene_indices(matrix, top_k=top_k, seed=3)
    assert [list(s) for s in sentences] == [[names[j] for j in e] for e in expected]
    longest = max(len(e) for e in expected)
    width = min(n_genes, top_k or n_genes) if layout == "dense" else longest
    assert sentences.genes.shape == (n_cells, width)


@pytest.mark.parametrize("top_k", [2, 30])
def test_a_gene_stored_twice_in_a_row_counts_once_with_its_values_summed(top_k):
    """CSR rows that store a gene twice (scipy sums such repeats) or out of order: the kernel says so,
    and the sentences are those of the summed, sorted matrix, in the block that has them and in the
    others; without the repeat summed, the gene would be ranked by its parts (or listed twice)."""
    from cellduality.sentences import _BLOCK_CELLS, _csr_rows, _TieOrder, cell_sentences
    from cellduality.topk import REPEATS, top_keys_csr

    rng = np.random.default_rng(5)
    n_cells, n_genes = 2 * _BLOCK_CELLS + 11, 40
    dense = np.where(rng.random((n_cells, n_genes)) < 0.5, rng.integers(1, 4, (n_cells, n_genes)), 0)
    dense[:, 0] = 0
    dense[_BLOCK_CELLS + 5, :] = 0
    dense[_BLOCK_CELLS + 5, [3, 9]] = [2, 3]
    canonical = sp.csr_matrix(dense.astype(np.float32))
    # row _BLOCK_CELLS + 5 stores gene 9 twice (1 + 2: third of three by either part, first once summed);
    # gene 0 of row 7 twice (4 + 5) after its others; row 8's genes in reverse order
    data, indices, indptr = [], [], [0]
    for r in range(n_cells):
        cols = list(canonical.indices[canonical.indptr[r] : canonical.indptr[r + 1]])
        vals = list(canonical.data[canonical.indptr[r] : canonical.indptr[r + 1]])
        if r == _BLOCK_CELLS + 5:
            cols, vals = [3, 9, 9], [2.0, 1.0, 2.0]
        elif r == 7:
            cols, vals = [*cols, 0, 0], [*vals, 4.0, 5.0]
        elif r == 8:
            cols, vals = cols[::-1], vals[::-1]
        data += vals
        indices += cols
        indptr.append(len(indices))
    repeated = sp.csr_matrix(
        (np.array(data, np.float32), np.array(indices, np.int32), np.array(indptr)), shape=(n_cells, n_genes)
    )
    assert not repeated.has_canonical_format
    summed = repeated.copy()
    summed.sum_duplicates()

    order = _TieOrder.from_seed(0)

    def strictly_increasing(x, start=0, stop=n_cells) -> bool:
        data, indices, indptr = _csr_rows(x, start, stop)
        keys = np.empty((stop - start, top_k), np.uint64)
        found = np.empty(stop - start, np.int64)
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        a, b = np.uint64(order.a), np.uint64(order.b)
        return (
            not top_keys_csr(bits, np.ascontiguousarray(indices), indptr, top_k, a, b, keys, found) & REPEATS
        )

    assert strictly_increasing(canonical) and strictly_increasing(summed)
    assert not strictly_increasing(repeated)
    assert strictly_increasing(repeated, 10, 20)  # rows without a repeat

    names = [f"G{j}" for j in range(n_genes)]
    got = cell_sentences(ad.AnnData(X=repeated, var=pd.DataFrame(index=names)), top_k=top_k)
    want = cell_sentences(ad.AnnData(X=summed, var=pd.DataFrame(index=names)), top_k=top_k)
    assert [list(s) for s in got] == [list(s) for s in want]
    assert list(got[_BLOCK_CELLS + 5])[:2] == ["G9", "G3"]
    assert got[7][0] == "G0" and list(got[7]).count("G0") == 1


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_gene_lists_full_partial_and_kept_rows(dtype):
    import pyarrow as pa

    from cellduality.sentences import gene_lists

    names = pa.array(["A", "B", "C", "D"])
    genes = np.array([[3, 0, 1], [2, 2, 0], [1, 3, 2]], dtype=dtype)
    full = gene_lists(names, genes, np.array([3, 3, 3]))
    assert full.to_pylist() == [["D", "A", "B"], ["C", "C", "A"], ["B", "D", "C"]]
    partial = gene_lists(names, genes, np.array([1, 0, 3]))
    assert partial.to_pylist() == [["D"], [], ["B", "D", "C"]]
    keep = np.array([[True, False, True], [True, True, True], [False, True, True]])
    kept = gene_lists(names, genes, np.array([3, 3, 3]), keep)
    assert kept.to_pylist() == [["D", "B"], ["C", "C", "A"], ["D", "C"]]
    # dictionary-encoded: the same words, each an index into the names (no symbol copied per word)
    for lengths, mask, plain in ((np.array([1, 0, 3]), None, partial), (np.array([3, 3, 3]), keep, kept)):
        encoded = gene_lists(names, genes, lengths, mask, dictionary=True)
        assert pa.types.is_dictionary(encoded.type.value_type)
        assert encoded.to_pylist() == plain.to_pylist()
        assert encoded.cast(pa.list_(pa.string())).equals(plain)


def test_sparse_values_the_kernel_flags_follow_pick_expressions_rules() -> None:
    """A sparse matrix is ranked in one pass that also checks its values: a NaN or an infinity is refused,
    negative values send it through pick_expression's rules (.raw, or z-scores on request), -0.0 is a
    stored zero, exactly as when pick_expression checks first (the dense path)."""
    import warnings

    from cellduality.data.schema import DataError
    from cellduality.sentences import _csr_rows, _TieOrder, cell_sentences
    from cellduality.topk import NEGATIVE, NOT_FINITE, top_keys_csr

    rng = np.random.default_rng(2)
    x = sp.random(60, 30, density=0.3, format="csr", random_state=3, dtype=np.float32)
    x.data = rng.integers(1, 6, x.nnz).astype(np.float32)
    names = [f"G{j}" for j in range(30)]

    def adata(m, raw=None):
        a = ad.AnnData(X=m, var=pd.DataFrame(index=names))
        if raw is not None:
            a.raw = raw
        return a

    def with_value(v: float) -> sp.csr_matrix:
        y = x.copy()
        y.data[7] = v
        return y

    def flags(m: sp.csr_matrix) -> int:
        data, indices, indptr = _csr_rows(m, 0, m.shape[0])
        order = _TieOrder.from_seed(0)
        keys, found = np.empty((m.shape[0], 5), np.uint64), np.empty(m.shape[0], np.int64)
        bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
        return top_keys_csr(bits, indices, indptr, 5, np.uint64(order.a), np.uint64(order.b), keys, found)

    assert flags(x) == 0 and flags(with_value(-0.0)) == 0
    assert flags(with_value(np.nan)) == NOT_FINITE and flags(with_value(-np.inf)) == NOT_FINITE | NEGATIVE
    assert flags(with_value(np.inf)) == NOT_FINITE and flags(with_value(-2.0)) == NEGATIVE

    def listed(s) -> list[list[str]]:
        return [list(r) for r in s]

    clean = listed(cell_sentences(adata(x), top_k=5))
    assert clean == listed(cell_sentences(adata(x.toarray()), top_k=5))  # the dense path checks first
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(DataError, match="NaN or infinite"):
            cell_sentences(adata(with_value(bad)), top_k=5)
    scaled = with_value(-2.0)
    with pytest.raises(DataError, match="allow-scaled"):
        cell_sentences(adata(scaled), top_k=5)
    with pytest.warns(UserWarning, match=r"\.raw"):
        assert listed(cell_sentences(adata(scaled, raw=adata(x)), top_k=5)) == clean
    zscores = listed(cell_sentences(adata(scaled), top_k=5, allow_scaled=True))
    assert zscores == listed(cell_sentences(adata(scaled.toarray()), top_k=5, allow_scaled=True))
    stored_zero = with_value(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert listed(cell_sentences(adata(with_value(-0.0)), top_k=5)) == listed(
            cell_sentences(adata(stored_zero), top_k=5)
        )
