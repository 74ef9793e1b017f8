"""Cell sentences: a cell becomes its expressed gene symbols ordered by expression, highest first.

The forward direction is vectorised over blocks of cells (no Python loop over cells), because a
user's atlas has hundreds of thousands of them. Ties are broken by a seeded random order of the genes,
so the same input and seed always give the same sentence. The inverse direction fits expression
against log10(rank) per dataset, as cell2sentence does, and is used by the evaluation to turn generated
sentences back into expression vectors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np
import scipy.sparse as sp

_BLOCK_CELLS = 1024


class Sentences(Sequence):
    """Cell sentences kept as gene indices: ``genes[c, :counts[c]]`` are cell c's genes, most expressed
    first, ``names`` their symbols. ``sentences[c]`` is the list of symbols, made when asked for.

    The task builders read the indices (a chunk of cells is a gather, not a list per cell) and turn
    them into text as Arrow columns (:meth:`arrow`); a Python list of symbols per cell costs more than
    choosing the genes did. ``positions`` (optional) makes this a view: entry i is cell
    ``positions[i]`` of the arrays, nothing copied.
    """

    __hash__ = None  # type: ignore[assignment]  (compared by value, like the lists it stands for)

    def __init__(
        self, genes: np.ndarray, counts: np.ndarray, names: Sequence[str], positions: np.ndarray | None = None
    ) -> None:
        self.genes = genes
        self.counts = counts
        self.names = names if isinstance(names, np.ndarray) else np.asarray(names, dtype=object)
        self.positions = positions
        self._shared: dict[str, object] = {}  # made once per gene list, shared with every view

    def __len__(self) -> int:
        return self.counts.size if self.positions is None else self.positions.size

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        c = i if self.positions is None else int(self.positions[i])
        return self.names[self.genes[c, : self.counts[c]]].tolist()

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == list(b) for a, b in zip(self, other, strict=True))

    def view(self, positions: np.ndarray) -> Sentences:
        """Entry i of the view is entry ``positions[i]`` of this one (no copy)."""
        positions = np.asarray(positions, dtype=np.int64)
        base = positions if self.positions is None else self.positions[positions]
        view = Sentences(self.genes, self.counts, self.names, base)
        view._shared = self._shared
        return view

    def rows(self, cells: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``limit`` gene indices of each of ``cells`` (entries of this sequence) as a
        (cells x width) int64 array and each one's length (what lies past it is meaningless)."""
        cells = np.asarray(cells, dtype=np.int64)
        at = cells if self.positions is None else self.positions[cells]
        width = min(limit, self.genes.shape[1])
        return self.genes[at, :width].astype(np.int64), np.minimum(self.counts[at], width).astype(np.int64)

    def arrow_names(self):
        """The symbols as an Arrow string array (what :meth:`arrow` takes from), made once."""
        if "names" not in self._shared:
            import pyarrow as pa

            self._shared["names"] = pa.array(self.names.tolist(), type=pa.string())
        return self._shared["names"]

    def score_array(self, gene_scores: Mapping[str, float] | None) -> np.ndarray | None:
        """``gene_scores`` per gene index (0 for a gene without a score, as ``hide_genes`` reads it),
        made once per scores object."""
        if gene_scores is None:
            return None
        cached = self._shared.get("scores")
        if cached is None or cached[0] is not gene_scores:
            values = (gene_scores.get(g, 0.0) for g in self.names.tolist())
            cached = (gene_scores, np.fromiter(values, dtype=np.float64, count=len(self.names)))
            self._shared["scores"] = cached
        return cached[1]

    def arrow(self, cells: np.ndarray | None = None, limit: int | None = None, *, dictionary: bool = False):
        """The sentences of ``cells`` (default all), each cut to ``limit`` genes, as an Arrow
        ``list<string>`` column: the text, without a Python object per cell.

        ``dictionary=True``: a ``list<dictionary<int64, string>>`` column instead, each word an index into
        the gene symbols (Arrow's encoding for repeated strings, as Parquet and pandas' categoricals
        keep them): the same words (``to_pylist``, ``cast`` to ``list<string>``), no symbol copied per
        word, so making it costs next to nothing."""
        cells = np.arange(len(self)) if cells is None else cells
        genes, lengths = self.rows(cells, self.genes.shape[1] if limit is None else limit)
        return gene_lists(self.arrow_names(), genes, lengths, dictionary=dictionary)

    def tolist(self) -> list[list[str]]:
        return [self[i] for i in range(len(self))]


def gene_lists(
    names, genes: np.ndarray, lengths: np.ndarray, keep: np.ndarray | None = None, *, dictionary: bool = False
):
    """An Arrow ``list<string>`` column: row r is ``names[genes[r, j]]`` for j < ``lengths[r]`` (and
    ``keep[r, j]``, when given), in order; ``dictionary=True``: the same words dictionary-encoded
    (``list<dictionary<index, string>>``, the indices and ``names`` as they are)."""
    import pyarrow as pa

    n, width = genes.shape
    if keep is None and n and bool((lengths == width).all()):  # every row full: no mask to apply
        offsets = np.arange(0, n * width + 1, width, dtype=np.int32)
        flat = np.ascontiguousarray(genes).reshape(-1)
    else:
        valid = np.arange(width)[None, :] < lengths[:, None]
        if keep is not None:
            valid &= keep[:, :width]
        offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(valid.sum(axis=1), out=offsets[1:])
        flat = genes[valid]
    indices = pa.array(flat)
    # Arrow's take reads any integer index type: the int16/int32 indices are not widened first
    words = pa.DictionaryArray.from_arrays(indices, names) if dictionary else names.take(indices)
    return pa.ListArray.from_arrays(pa.array(offsets), words)


_LOW32 = np.uint64(0xFFFFFFFF)
_MOD32 = 1 << 32


@dataclass(frozen=True)
class _TieOrder:
    """A seeded bijection gene index <-> 32-bit tie key: ``key = (a * gene + b) mod 2**32``, ``a`` odd.

    Ties in expression are broken by this key, so the order is deterministic for a seed and differs
    between seeds. An affine map is computed in one vectorised pass (no random gather over the
    non-zeros), and inverted exactly to recover the gene from a sort key.
    """

    a: int
    b: int

    @classmethod
    def from_seed(cls, seed: int) -> _TieOrder:
        rng = np.random.default_rng(seed)
        a, b = (int(v) for v in rng.integers(0, _MOD32, size=2, dtype=np.uint64))
        return cls(a | 1, b)

    def encode(self, genes: np.ndarray) -> np.ndarray:
        keys = genes.astype(np.uint64) * np.uint64(self.a)
        keys += np.uint64(self.b)
        keys &= _LOW32
        return keys

    def decode(self, keys: np.ndarray) -> np.ndarray:
        low = (keys & _LOW32) + np.uint64(_MOD32 - self.b)
        low &= _LOW32
        low *= np.uint64(pow(self.a, -1, _MOD32))
        low &= _LOW32
        return low.astype(np.int64)


def _sort_keys(values: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """uint64 keys ordering (value, tie) pairs: float32 bits of a positive value in the high word.

    For positive IEEE floats the bit pattern orders like the value, so integer comparison of the keys
    sorts by expression first and by the seeded tie key second. Non-positive values get key 0.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    keys = values.view(np.uint32).astype(np.uint64)
    keys <<= np.uint64(32)
    keys |= tie
    if values.size and values.min() <= 0:
        keys[values <= 0] = 0
    return keys


def _top_genes(keys: np.ndarray, k: int | None, order: _TieOrder) -> tuple[np.ndarray, np.ndarray]:
    """Gene indices of the k largest keys per row (largest first, -1 padded) and their counts."""
    width = keys.shape[1]
    kk = width if k is None else min(k, width)
    if kk < width // 2:  # a partition first pays off only when it discards most of the row
        keys = np.partition(keys, width - kk, axis=1)[:, width - kk :]
    keys = np.sort(keys, axis=1)[:, : -kk - 1 : -1]
    valid = keys > 0
    genes = order.decode(keys)
    genes[~valid] = -1
    return genes, valid.sum(axis=1)


def _csr_rows(matrix: sp.csr_matrix, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views of the data, indices and (rebased) indptr of rows ``start:stop``: no copy, unlike slicing."""
    lo, hi = matrix.indptr[start], matrix.indptr[stop]
    return matrix.data[lo:hi], matrix.indices[lo:hi], matrix.indptr[start : stop + 1] - lo


def _pad(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """CSR rows' values as a (rows x longest row) matrix, zero-padded on the right.

    Built as a CSR matrix whose column index is the position within the row, densified by scipy's
    C++ loop: about 3x faster than a numpy scatter with computed flat indices.
    """
    counts = np.diff(indptr)
    n, width = counts.size, int(counts.max())
    itype = np.int32 if max(width, int(indptr[-1])) < 2**31 else np.int64
    pos = np.arange(indptr[-1], dtype=itype)
    pos -= np.repeat(indptr[:-1].astype(itype), counts)
    return sp.csr_matrix((values, pos, indptr.astype(itype)), shape=(n, width)).toarray()


def _block_sparse(
    rows: tuple[np.ndarray, np.ndarray, np.ndarray],
    k: int | None,
    order: _TieOrder,
    out: np.ndarray | None = None,
    seen: list[int] | None = None,
):
    """Top-k gene indices (padded with -1) and their counts for CSR rows (data, indices, indptr).

    The compiled kernel of ``cellduality.topk``; the same result as :func:`_block_sparse_numpy`. With
    ``out`` (rows x at least the block's width, any integer type, filled with -1) the indices are written
    there and a view of it is returned: no int64 block to convert and copy. ``seen`` gets the block's
    ``NOT_FINITE`` and ``NEGATIVE`` bits (``cellduality.topk``) appended.
    """
    from cellduality.topk import REPEATS, genes_of_keys, top_keys_csr

    data, indices, indptr = rows
    counts = np.diff(indptr)
    n = counts.size
    width = int(counts.max()) if n else 0
    kk = width if k is None else min(k, width)
    if n == 0 or kk == 0:
        return np.full((n, 0), -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    keys = np.empty((n, kk), dtype=np.uint64)
    found = np.empty(n, dtype=np.int64)
    flags = top_keys_csr(
        bits,
        np.ascontiguousarray(indices),
        np.ascontiguousarray(indptr),
        kk,
        np.uint64(order.a),
        np.uint64(order.b),
        keys,
        found,
    )
    if seen is not None:
        seen.append(flags & ~REPEATS)
    if flags & REPEATS:  # a gene stored twice in a row (or unsorted): its values summed, as scipy does
        block = sp.csr_matrix((data, indices, indptr), shape=(n, int(indices.max()) + 1), copy=True)
        block.sum_duplicates()
        return _block_sparse((block.data, block.indices, block.indptr), k, order, out)
    keys.sort(axis=1)  # numpy's vectorised sort, ascending: read backwards, largest first
    width = int(found.max())
    genes = np.empty((n, width), dtype=np.int64) if out is None else out
    genes_of_keys(keys, width, np.uint64(order.b), np.uint64(pow(order.a, -1, _MOD32)), genes)
    return genes[:, :width], found


def _block_sparse_numpy(rows: tuple[np.ndarray, np.ndarray, np.ndarray], k: int | None, order: _TieOrder):
    """Top-k gene indices (padded with -1) and their counts for CSR rows (data, indices, indptr).

    Two passes keep the expensive part small: a float32 partition finds each row's k-th largest value,
    then only the entries at or above it (k plus any ties at the cut) get 64-bit sort keys.
    """
    data, indices, indptr = rows
    counts = np.diff(indptr)
    n = counts.size
    if n == 0 or int(counts.max()) == 0:
        return np.full((n, 0), -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    data = np.asarray(data, dtype=np.float32)
    width = int(counts.max())
    if k is not None and k < width:
        kth = np.partition(_pad(data, indptr), width - k, axis=1)[:, width - k]
        keep = data >= np.repeat(kth, counts)
        keep &= data > 0
        kept = np.flatnonzero(keep)
        indptr = np.concatenate([[0], np.cumsum(keep)])[indptr]
        data, indices = data[kept], indices[kept]
        if indptr[-1] == 0:
            return np.full((n, 0), -1, dtype=np.int64), np.zeros(n, dtype=np.int64)
    return _top_genes(_pad(_sort_keys(data, order.encode(indices)), indptr), k, order)


def _block_dense(block: np.ndarray, k: int | None, order: _TieOrder):
    """Top-k gene indices (padded with -1) and their counts for a dense block of cells."""
    tie = order.encode(np.arange(block.shape[1]))
    return _top_genes(_sort_keys(block, tie[None, :]), k, order)


T = TypeVar("T")


def _blocks(
    matrix,
    top_k: int | None,
    seed: int,
    finish: Callable[[int, np.ndarray, np.ndarray], list[T]],
    out: Callable[[int, int], np.ndarray | None] = lambda start, stop: None,
    seen: list[int] | None = None,
) -> list[T]:
    """Per cell, ``finish(first cell, gene indices padded with -1, counts)`` of consecutive blocks of
    cells; ``out(start, stop)`` may give the array a sparse block's indices are written into; ``seen``
    collects what the compiled kernel saw of a sparse matrix's values (``_block_sparse``).

    Blocks run on a thread pool: numpy and the compiled kernel release the GIL, so one block's work
    overlaps another's ``finish`` (Python objects, GIL held).
    """
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
    n_cells = matrix.shape[0]
    order = _TieOrder.from_seed(seed)
    sparse = sp.issparse(matrix)
    if sparse:  # a block with a gene stored twice in a row sums its repeats (``_block_sparse``)
        matrix = sp.csr_matrix(matrix)

    def block(start: int) -> list[T]:
        stop = min(start + _BLOCK_CELLS, n_cells)
        if sparse:
            rows = _csr_rows(matrix, start, stop)
            cols, counts = _block_sparse(rows, top_k, order, out(start, stop), seen)
        else:
            cols, counts = _block_dense(np.asarray(matrix[start:stop]), top_k, order)
        return finish(start, cols, counts)

    starts = range(0, n_cells, _BLOCK_CELLS)
    if len(starts) < 2:
        parts = [block(s) for s in starts]
    else:
        with ThreadPoolExecutor(max_workers=min(len(starts), os.cpu_count() or 1, 8)) as pool:
            parts = list(pool.map(block, starts))
    return [item for part in parts for item in part]


def top_gene_indices(matrix, top_k: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Per cell, indices of expressed genes (value > 0) ordered by value, highest first, truncated to k.

    Accepts a dense array or any scipy sparse matrix; returns one int64 array per cell.
    """
    return _blocks(
        matrix, top_k, seed, lambda _, cols, counts: [r[:c] for r, c in zip(cols, counts, strict=True)]
    )


def cell_sentences(
    adata, top_k: int | None = None, seed: int = 0, *, layer: str | None = None, allow_scaled: bool = False
) -> Sentences:
    """Ordered gene symbols per cell (expressed genes only; ``top_k=None`` keeps all), as
    :class:`Sentences`: gene indices until the text is needed (``sentences[i]`` is a list of symbols,
    ``sentences.arrow()`` all of them as an Arrow column).

    The matrix follows the rules of ``cellduality prepare`` (``cellduality.data.loading.pick_expression``):
    ``.X`` or ``layer``; a scaled ``.X`` (negative values, e.g. after ``sc.pp.scale``) is replaced by
    ``.raw`` when it exists, with a warning, and refused otherwise unless ``allow_scaled=True`` (rank the
    z-scores on purpose); NaN or infinite values are refused. Gene symbols come from the var names of the
    matrix used. Raw counts and log-normalised values give the same ranking within a cell.
    """
    import warnings

    from cellduality.data.loading import expression_matrix, pick_expression

    matrix, var = expression_matrix(adata, layer)
    if sp.issparse(matrix):
        # the compiled kernel reads every value anyway: when all are finite and non-negative,
        # pick_expression would keep this matrix as it is, and its checks need no pass of their own
        seen: list[int] = []
        sentences = _sentences(matrix, var, top_k, seed, seen)
        if not any(seen):
            return sentences
    notes: list[str] = []
    matrix, var, _ = pick_expression(adata, layer=layer, allow_scaled=allow_scaled, notes=notes)
    for note in notes:
        if note.startswith(".X is scaled"):  # said once per call: the caller may not expect it
            warnings.warn(f"cell_sentences: {note}", UserWarning, stacklevel=2)
    return _sentences(matrix, var, top_k, seed)


def _sentences(matrix, var, top_k: int | None, seed: int, seen: list[int] | None = None) -> Sentences:
    """The sentences of a matrix already chosen (``seen``: see :func:`_blocks`)."""
    names = np.asarray(var.index, dtype=object)
    dtype = np.int16 if len(names) < np.iinfo(np.int16).max else np.int32
    n_cells = matrix.shape[0]
    sparse = sp.issparse(matrix)
    # a row has at most its stored values (a dense row: every gene)
    stored = np.diff(sp.csr_matrix(matrix).indptr) if sparse else np.full(n_cells, matrix.shape[1])
    room = int(stored.max()) if n_cells else 0
    room = max(room if top_k is None else min(room, top_k), 1)
    # every block writes its rows in place (a sparse block directly from the compiled kernel)
    genes = np.full((n_cells, room), -1, dtype=dtype)
    counts = np.zeros(n_cells, dtype=np.int32)

    def finish(start: int, cols: np.ndarray, n: np.ndarray) -> list[int]:
        stop = start + cols.shape[0]
        if not sparse:  # a dense block's indices come back as their own array
            genes[start:stop, : cols.shape[1]] = cols
        counts[start:stop] = n
        return [cols.shape[1]]

    def out(start: int, stop: int) -> np.ndarray:
        return genes[start:stop]

    width = max(_blocks(matrix, top_k, seed, finish, out, seen), default=0)
    return Sentences(genes if width >= room else genes[:, : max(width, 1)], counts, names)


class GenePresence:
    """Counts of every gene over the first ``top_k`` genes of the sentences, and where each gene was
    first seen: ``cellduality.tasks.common.presence_scores`` from gene indices, block by block."""

    def __init__(self, n_genes: int, top_k: int) -> None:
        self.top_k = top_k
        self.counts = np.zeros(n_genes, dtype=np.int64)
        self.first = np.full(n_genes, np.iinfo(np.int64).max, dtype=np.int64)
        self.n = 0

    def add(self, offset: int, genes: np.ndarray, counts: np.ndarray) -> None:
        """The sentences of cells ``offset, offset + 1, ...`` (gene indices, lengths)."""
        from cellduality.topk import count_presence

        if genes.shape[0]:
            count_presence(genes, np.asarray(counts), self.top_k, offset, self.counts, self.first)
        self.n += genes.shape[0]

    def _add_numpy(self, offset: int, genes: np.ndarray, counts: np.ndarray) -> None:
        """:meth:`add` in numpy: the reference the compiled loop is tested against."""
        top = genes[:, : self.top_k]
        valid = np.arange(top.shape[1])[None, :] < np.minimum(counts, self.top_k)[:, None]
        flat = np.flatnonzero(valid.ravel())
        ids = top.ravel()[flat].astype(np.int64)
        self.counts += np.bincount(ids, minlength=self.counts.size)
        # position of a gene = (cell, rank) in reading order; the block's cells follow all earlier ones
        pos = (offset + flat // top.shape[1]) * self.top_k + flat % top.shape[1]
        first = np.full(self.first.size, np.iinfo(np.int64).max, dtype=np.int64)
        first[ids[::-1]] = pos[::-1]  # repeated indices keep the last value assigned: the earliest
        np.minimum(self.first, first, out=self.first)
        self.n += genes.shape[0]

    def scores(self, names: Sequence[str]) -> dict[str, float]:
        """``presence_scores`` of the sentences added: ``p * (1 - p)`` per gene, in first-seen order."""
        seen = np.flatnonzero(self.counts)
        order = seen[np.argsort(self.first[seen], kind="stable")]
        n = max(1, self.n)
        return {str(names[j]): (int(self.counts[j]) / n) * (1 - int(self.counts[j]) / n) for j in order}


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
    sub = adata.X[fit_sample(adata.n_obs, seed, max_cells)]
    return fit_rank_expression_rows(sub, top_k=top_k, seed=seed)


def fit_sample(n_cells: int, seed: int = 0, max_cells: int = 5000) -> np.ndarray:
    """The cells (sorted positions) :func:`fit_rank_expression` fits on: a seeded sample of at most
    ``max_cells``; the block-wise ``prepare`` reads exactly these rows of a file."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_cells, size=min(max_cells, n_cells), replace=False))


def fit_rank_expression_rows(sub, top_k: int | None = None, seed: int = 0) -> RankExpressionFit:
    """The fit of :func:`fit_rank_expression` on the sampled cells ``sub`` (rows of the matrix).

    The expression at rank r of a cell is its r-th largest positive value, whichever gene a tie gives
    that rank to, so the values are sorted per row (one lexsort) rather than looked up gene by gene.
    ``seed`` (the tie order) therefore does not change the fit; it is kept for the signature.
    """
    del seed
    sub = sp.csr_matrix(sub, dtype=np.float32)
    if not sub.has_canonical_format:  # repeated entries of a gene are one value, as in the sentences
        sub = sub.copy()
        sub.sum_duplicates()
    cell = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
    expressed = sub.data > 0
    values, cell = sub.data[expressed], cell[expressed]
    order = np.lexsort((-values, cell))
    values, cell = values[order], cell[order]
    lengths = np.bincount(cell, minlength=sub.shape[0]).astype(np.int64)
    if top_k is not None:
        first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        keep = np.arange(values.size) - np.repeat(first, lengths) < top_k
        values, lengths = values[keep], np.minimum(lengths, top_k)
    if lengths.sum() == 0:
        raise ValueError("cannot fit rank -> expression: no cell has an expressed gene")
    y = values.astype(np.float64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    x = np.log10((np.arange(y.size) - np.repeat(first, lengths) + 1).astype(np.float64))  # log10(rank)
    if np.ptp(x) == 0:
        slope, intercept = 0.0, float(y.mean())
    else:
        slope, intercept = np.polyfit(x, y, 1)
    pred = slope * x + intercept
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    max_rank = int(lengths.max())
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
