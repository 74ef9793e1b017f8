"""Cell sentences: CellDuality's vectorised ``cell_sentences`` against cell2sentence's per-row loop.

The reference re-implements cell2sentence 1.2's ``generate_sentences`` (``cell2sentence/utils.py``): a
Python loop over cells that shuffles each row's non-zeros (sklearn's ``shuffle``, the tie-break),
stably sorts them by value, maps every gene to its name and joins the sentence into a string; a c2s
user then keeps the first ``top_k`` words. A second, lighter variant of the same loop (only the top-k
names mapped, no string) is timed too, so the ratio is not flattered by the reference's string work.
Both run in this process on the same synthetic count matrix (20,000 cells x 20,000 genes, about
2,000 non-zeros per cell, Poisson-like values so that ties are common) with top_k=200, interleaved:
each round times ``cell_sentences`` on the whole matrix and the reference loops on one slice of the
cells (the slices add up to the matrix), so a busy machine slows both alike.
``cell_sentences`` returns gene indices (``Sentences``); the text, when it is needed, is one Arrow
``list<string>`` column (``.arrow()``), timed too, and so is the same text dictionary-encoded
(``.arrow(dictionary=True)``: each word an index into the gene symbols, no symbol copied per word).
Target: at least 100x the reference's cells/s for the sentences and for sentences + each text column.
The last line says where the time goes.

    python benchmarks/sentences.py [--cells 20000] [--genes 20000] [--nnz 2000] [--top-k 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.utils import shuffle

from cellduality.sentences import cell_sentences

TARGET_RATIO = 100.0


def synthetic_counts(n_cells: int, n_genes: int, nnz: int, seed: int = 0) -> sp.csr_matrix:
    """A CSR matrix with ``nnz`` distinct expressed genes per cell and count-like values."""
    rng = np.random.default_rng(seed)
    width = min(n_genes, int(nnz * 1.1))
    cols = np.sort(rng.integers(0, n_genes, size=(n_cells, width), dtype=np.int32), axis=1)
    keep = np.ones_like(cols, dtype=bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # distinct genes per cell
    keep &= np.cumsum(keep, axis=1) <= nnz
    counts = keep.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    data = (rng.geometric(0.35, size=int(indptr[-1])) + 0).astype(np.float32)
    return sp.csr_matrix((np.log1p(data), cols[keep], indptr), shape=(n_cells, n_genes))


def reference_sentences(
    matrix: sp.csr_matrix, genes: np.ndarray, top_k: int, seed: int = 0
) -> list[list[str]]:
    """cell2sentence 1.2's loop: shuffle, stable sort, map every gene, join; then keep top_k words."""
    enc_map = list(genes)
    sentences = []
    for i in range(matrix.shape[0]):
        cols = matrix.indices[matrix.indptr[i] : matrix.indptr[i + 1]]
        vals = matrix.data[matrix.indptr[i] : matrix.indptr[i + 1]]
        cols, vals = shuffle(cols, vals, random_state=seed)
        sentence = " ".join([enc_map[x] for x in cols[np.argsort(-vals, kind="stable")]])
        sentences.append(sentence.split(" ", top_k)[:top_k])
    return sentences


def reference_top_k_only(
    matrix: sp.csr_matrix, genes: np.ndarray, top_k: int, seed: int = 0
) -> list[list[str]]:
    """The same loop made lighter: only the top-k names are mapped, no string is built."""
    sentences = []
    for i in range(matrix.shape[0]):
        start, stop = matrix.indptr[i], matrix.indptr[i + 1]
        cols, vals = shuffle(matrix.indices[start:stop], matrix.data[start:stop], random_state=seed)
        order = np.argsort(-vals, kind="stable")[:top_k]
        sentences.append([genes[j] for j in cols[order]])
    return sentences


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=20_000)
    parser.add_argument("--nnz", type=int, default=2_000)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (reference slices)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    matrix = synthetic_counts(args.cells, args.genes, args.nnz)
    genes = np.array([f"GENE{j}" for j in range(args.genes)], dtype=object)
    adata = ad.AnnData(X=matrix, var=pd.DataFrame(index=genes))
    print(
        f"matrix: {args.cells} cells x {args.genes} genes, {matrix.nnz / args.cells:.0f} non-zeros per cell "
        f"(built in {time.perf_counter() - t0:.1f} s), top_k={args.top_k}"
    )

    # warm both up on a few cells (imports, thread pool, the compiled kernel), then time them
    cell_sentences(adata[:500], top_k=args.top_k, seed=0).arrow()
    reference_sentences(matrix[:500], genes, args.top_k)
    reference_top_k_only(matrix[:500], genes, args.top_k)

    rounds = args.rounds
    bounds = np.linspace(0, args.cells, rounds + 1).astype(int)
    t_ours, t_text, t_encoded, t_ref, t_light = [], [], [], 0.0, 0.0
    ref: list[list[str]] = []
    for r in range(rounds):  # interleaved: ours on every cell, the loops on 1/rounds of them
        t0 = time.perf_counter()
        ours = cell_sentences(adata, top_k=args.top_k, seed=0)
        t1 = time.perf_counter()
        text = ours.arrow()
        t2 = time.perf_counter()
        encoded = ours.arrow(dictionary=True)
        t3 = time.perf_counter()
        t_ours.append(t1 - t0)
        t_text.append(t2 - t0)
        t_encoded.append(t1 - t0 + t3 - t2)
        part = matrix[bounds[r] : bounds[r + 1]]
        t0 = time.perf_counter()
        ref += reference_sentences(part, genes, args.top_k)
        t_ref += time.perf_counter() - t0
        t0 = time.perf_counter()
        reference_top_k_only(part, genes, args.top_k)
        t_light += time.perf_counter() - t0
    t_ours_s, t_text_s = statistics.median(t_ours), statistics.median(t_text)
    t_encoded_s = statistics.median(t_encoded)

    # same genes at every rank up to ties: compare the multiset of values per cell
    for i in range(0, args.cells, max(1, args.cells // 50)):
        row = matrix[i].toarray().ravel()
        a = np.sort(row[[int(g[4:]) for g in ours[i]]])
        b = np.sort(row[[int(g[4:]) for g in ref[i]]])
        assert np.array_equal(a, b), f"cell {i}: different expression values selected"
        assert text[i].as_py() == ours[i] == encoded[i].as_py()

    ours_rate, text_rate = args.cells / t_ours_s, args.cells / t_text_s
    encoded_rate = args.cells / t_encoded_s
    ref_rate, light_rate = args.cells / t_ref, args.cells / t_light
    print(
        f"cellduality cell_sentences    : {ours_rate:10,.0f} cells/s ({t_ours_s:.2f} s, median of {rounds}; "
        "gene indices)"
    )
    print(
        f"  + Arrow text column         : {text_rate:10,.0f} cells/s ({t_text_s:.2f} s, median of {rounds})"
    )
    print(
        f"  + dictionary-encoded text   : {encoded_rate:10,.0f} cells/s ({t_encoded_s:.2f} s, median of "
        f"{rounds}; .arrow(dictionary=True))"
    )
    print(f"cell2sentence 1.2 loop (ref.) : {ref_rate:10,.0f} cells/s ({t_ref:.2f} s in {rounds} slices)")
    print(f"same loop, top-k names only   : {light_rate:10,.0f} cells/s ({t_light:.2f} s)")
    for what, rate in (
        ("sentences", ours_rate),
        ("sentences + text", text_rate),
        ("sentences + dictionary text", encoded_rate),
    ):
        ratio = rate / ref_rate
        verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
        print(f"ratio to the reference, {what:27s}: {ratio:7.1f}x (target >= {TARGET_RATIO:.0f}x: {verdict})")
    print(f"ratio to the lighter loop, sentences + text: {text_rate / light_rate:7.1f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    breakdown(adata, args.top_k, t_ours_s)


def breakdown(adata: ad.AnnData, top_k: int, total: float) -> None:
    """Where ``cell_sentences``' time goes, one thread: the matrix as float32 (``expression_matrix``, no
    copy for a float32 CSR), the compiled top-k over all rows (with its checks of every value and gene
    index: NaN, infinite and negative values, a gene stored twice), the gene indices as an Arrow text
    column."""
    from cellduality.data.loading import expression_matrix
    from cellduality.sentences import Sentences, _block_sparse, _csr_rows, _TieOrder

    n = adata.n_obs
    t0 = time.perf_counter()
    matrix, var = expression_matrix(adata)
    t1 = time.perf_counter()
    genes, counts = _block_sparse(_csr_rows(matrix, 0, n), top_k, _TieOrder.from_seed(0))
    t2 = time.perf_counter()
    Sentences(genes, counts, np.asarray(var.index, dtype=object)).arrow()
    t3 = time.perf_counter()
    per_cell = 1e6 / n
    print(
        f"where the time goes (us per cell, one thread; all of cell_sentences: {total * per_cell:.1f} us with "
        f"its thread pool): the matrix {(t1 - t0) * per_cell:.1f}, compiled top-k with the value checks "
        f"{(t2 - t1) * per_cell:.1f}, indices -> Arrow text {(t3 - t2) * per_cell:.1f}"
    )


if __name__ == "__main__":
    main()
