"""Cell sentences: a cell becomes its expressed gene symbols ordered by expression, highest first.

The forward direction is vectorised over blocks of cells (no Python loop over cells), because a
user's atlas has hundreds of thousands of them. Ties are broken by a seeded random order of the genes,
so the same input and seed always give the same sentence. The inverse direction fits expression
against log10(rank) per dataset, as cell2sentence does, and is used by the evaluation to turn generated
sentences back into expression vectors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp

_BLOCK_CELLS = 4096


def _tie_keys(n_genes: int, seed: int) -> np.ndarray:
    """A unique, seeded secondary key per gene (uint64) used to break expression ties."""
    rng = np.random.default_rng(seed)
    return rng.permutation(n_genes).astype(np.uint64)


def _value_keys(values: np.ndarray) -> np.ndarray:
    """Order-preserving uint64 of positive float32 values, shifted to leave room for the tie key."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return bits << np.uint64(32)


def _top_positions(keys: np.ndarray, k: int) -> np.ndarray:
    """Column positions of the k largest keys per row, largest first (keys are unique where > 0)."""
    width = keys.shape[1]
    if k < width:
        part = np.argpartition(keys, width - k, axis=1)[:, width - k :]
    else:
        part = np.broadcast_to(np.arange(width), keys.shape).copy()
    top = np.take_along_axis(keys, part, axis=1)
    order = np.argsort(top, axis=1)[:, ::-1]
    return np.take_along_axis(part, order, axis=1)


def _block_sparse(block: sp.csr_matrix, k: int | None, tie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gene indices (padded with -1) and their counts for a CSR block of cells."""
    block.sort_indices()
    indptr = block.indptr
    counts = np.diff(indptr)
    n = block.shape[0]
    width = int(counts.max()) if n else 0
    if width == 0:
        return np.full((n, 0), -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    rows = np.repeat(np.arange(n), counts)
    pos = np.arange(indptr[-1]) - np.repeat(indptr[:-1], counts)
    data = block.data
    positive = data > 0
    keys = np.zeros((n, width), dtype=np.uint64)
    cols = np.full((n, width), -1, dtype=np.int64)
    keys[rows, pos] = np.where(positive, _value_keys(np.where(positive, data, 0)) | tie[block.indices], 0)
    cols[rows, pos] = block.indices
    kk = width if k is None else min(k, width)
    top = _top_positions(keys, kk)
    top_keys = np.take_along_axis(keys, top, axis=1)
    top_cols = np.take_along_axis(cols, top, axis=1)
    top_cols[top_keys == 0] = -1
    return top_cols, (top_keys > 0).sum(axis=1)


def _block_dense(block: np.ndarray, k: int | None, tie: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gene indices (padded with -1) and their counts for a dense block of cells."""
    values = np.asarray(block, dtype=np.float32)
    positive = values > 0
    keys = np.where(positive, _value_keys(np.where(positive, values, 0)) | tie[None, :], np.uint64(0))
    kk = values.shape[1] if k is None else min(k, values.shape[1])
    top = _top_positions(keys, kk)
    top_keys = np.take_along_axis(keys, top, axis=1)
    top[top_keys == 0] = -1
    return top, (top_keys > 0).sum(axis=1)


def top_gene_indices(matrix, top_k: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Per cell, indices of expressed genes (value > 0) ordered by value, highest first, truncated to k.

    Accepts a dense array or any scipy sparse matrix; returns one int64 array per cell.
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    n_cells, n_genes = matrix.shape
    tie = _tie_keys(n_genes, seed)
    sparse = sp.issparse(matrix)
    if sparse:
        matrix = sp.csr_matrix(matrix)
    out: list[np.ndarray] = []
    for start in range(0, n_cells, _BLOCK_CELLS):
        stop = min(start + _BLOCK_CELLS, n_cells)
        if sparse:
            cols, counts = _block_sparse(matrix[start:stop], top_k, tie)
        else:
            cols, counts = _block_dense(np.asarray(matrix[start:stop]), top_k, tie)
        out.extend(row[:c] for row, c in zip(cols, counts, strict=True))
    return out


def cell_sentences(adata, top_k: int | None = None, seed: int = 0) -> list[list[str]]:
    """Ordered gene symbols per cell of ``adata.X`` (expressed genes only; ``top_k=None`` keeps all).

    ``adata`` must already be log-normalised with symbols as ``var_names`` (see ``cellduality.data``).
    """
    names = np.asarray(adata.var_names, dtype=object)
    n_cells, n_genes = adata.shape
    tie = _tie_keys(n_genes, seed)
    matrix = adata.X
    sparse = sp.issparse(matrix)
    if sparse:
        matrix = sp.csr_matrix(matrix)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    sentences: list[list[str]] = []
    for start in range(0, n_cells, _BLOCK_CELLS):
        stop = min(start + _BLOCK_CELLS, n_cells)
        block = matrix[start:stop]
        cols, counts = (_block_sparse if sparse else _block_dense)(
            block if sparse else np.asarray(block), top_k, tie
        )
        if cols.shape[1] == 0:
            sentences.extend([] for _ in range(stop - start))
            continue
        words = names[np.maximum(cols, 0)].tolist()
        sentences.extend(row[:c] for row, c in zip(words, counts.tolist(), strict=True))
    return sentences


@dataclass(frozen=True)
class RankExpressionFit:
    """Linear fit ``expression = slope * log10(rank) + intercept`` over expressed genes of a dataset.

    ``r2`` says how much of the expression a rank alone explains; it is reported with every dataset
    so nobody mistakes a reconstructed cell for a measured one.
    """

    slope: float
    intercept: float
    r2: float
    n_points: int
    max_rank: int

    def expression(self, ranks: np.ndarray) -> np.ndarray:
        """Predicted expression for 1-based ranks (never negative)."""
        values = self.slope * np.log10(np.asarray(ranks, dtype=np.float64)) + self.intercept
        return np.clip(values, 0.0, None)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, payload: dict) -> RankExpressionFit:
        return cls(**{k: payload[k] for k in ("slope", "intercept", "r2", "n_points", "max_rank")})


def fit_rank_expression(
    adata, top_k: int | None = None, seed: int = 0, max_cells: int = 5000
) -> RankExpressionFit:
    """Fit expression against log10(rank) on (a seeded sample of) the dataset's cells."""
    n_cells = adata.n_obs
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(n_cells, size=min(max_cells, n_cells), replace=False))
    sub = adata.X[cells]
    indices = top_gene_indices(sub, top_k=top_k, seed=seed)
    lengths = np.array([len(i) for i in indices], dtype=np.int64)
    if lengths.sum() == 0:
        raise ValueError("cannot fit rank -> expression: no cell has an expressed gene")
    rows = np.repeat(np.arange(len(indices)), lengths)
    cols = np.concatenate(indices)
    y = np.asarray(sub[rows, cols], dtype=np.float64).ravel()
    x = np.log10(np.concatenate([np.arange(1, n + 1, dtype=np.float64) for n in lengths]))
    if np.ptp(x) == 0:
        slope, intercept = 0.0, float(y.mean())
    else:
        slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    max_rank = int(max(len(i) for i in indices))
    return RankExpressionFit(float(slope), float(intercept), float(r2), int(x.size), max_rank)


def sentence_to_expression(
    sentence: Sequence[str], genes: Sequence[str], fit: RankExpressionFit
) -> np.ndarray:
    """Expression vector over ``genes`` for a sentence: listed genes get the fitted value of their rank.

    Genes not in the sentence are 0; symbols not in ``genes`` are ignored (matched case-insensitively);
    repeated symbols keep their first rank.
    """
    index = {str(g).casefold(): i for i, g in enumerate(genes)}
    vector = np.zeros(len(genes), dtype=np.float64)
    seen: set[int] = set()
    rank = 0
    positions: list[int] = []
    ranks: list[int] = []
    for symbol in sentence:
        j = index.get(str(symbol).casefold())
        if j is None or j in seen:
            continue
        seen.add(j)
        rank += 1
        positions.append(j)
        ranks.append(rank)
    if positions:
        vector[positions] = fit.expression(np.asarray(ranks))
    return vector


def sentences_to_matrix(
    sentences: Sequence[Sequence[str]], genes: Sequence[str], fit: RankExpressionFit
) -> np.ndarray:
    """Stack ``sentence_to_expression`` over many sentences (cells x genes)."""
    out = np.zeros((len(sentences), len(genes)), dtype=np.float64)
    for i, sentence in enumerate(sentences):
        out[i] = sentence_to_expression(sentence, genes, fit)
    return out
