"""``prepare_anndata``'s rules applied to an ``.h5ad`` file block by block, with memory bounded by the block.

Every decision ``prepare_anndata`` takes from the whole matrix is taken here from a first pass over the
file (:func:`open_streamed`), before a single sentence is written: whether ``.X`` is scaled (then
``raw/X`` stands in), whether values are NaN, counts or un-logged, which of two columns with one symbol
is the more expressed, and which cells are empty. The first pass reads only the stored values (and the
column indices when columns are dropped); a second, only when duplicate symbols exist, finds the
empty cells among the kept columns. :meth:`StreamedSource.normalise` then applies to one block exactly
the operations ``prepare_anndata`` applies to the whole matrix, all of which act on each row alone, so
a block's rows come out as the same rows of the in-memory matrix.

What is not per row: the duplicate-symbol totals are summed in float64 here (``prepare_anndata`` sums in
float32), so two duplicate columns whose totals agree to float32 precision may be resolved differently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellduality.data.backed import BlockMatrix, H5adFile
from cellduality.data.loading import (
    LOG_NORMALISED,
    ZSCORE,
    CellData,
    _as_float_matrix,
    _mouse_note,
    _symbols,
    _tidy_obs,
    finite_range,
)
from cellduality.data.normalise import normalise_counts
from cellduality.data.schema import Columns, DataError

#: values read at once by the first pass (CSR ``data``): 64 MB of float32
_SCAN_VALUES = 16_000_000
#: the sample ``prepare_anndata`` decides "raw counts" on: the first stored values
_COUNTS_SAMPLE = 200_000

Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(desc: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class _Scan:
    """What one pass over a matrix's stored values found."""

    n_values: int = 0
    n_bad: int = 0
    minimum: float = np.inf
    maximum: float = -np.inf
    binary: bool = True

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32)
        if values.size == 0:
            return
        self.n_values += values.size
        n_bad, lo, hi = finite_range(values)
        self.n_bad += n_bad
        if lo > hi:  # no finite value
            return
        self.minimum = min(self.minimum, lo)
        self.maximum = max(self.maximum, hi)
        # only values within [0, 1] can all be 0 or 1: the comparison pass is skipped for any other block
        if self.binary and not (lo >= 0.0 and hi <= 1.0):
            self.binary = False
        elif self.binary:
            finite = values if not n_bad else values[np.isfinite(values)]
            self.binary = bool(np.isin(finite, (0.0, 1.0)).all())


def _scan(
    matrix: BlockMatrix, block_cells: int, col_mask: np.ndarray | bool | None = None
) -> tuple[_Scan, np.ndarray | None]:
    """Finite check, minimum, maximum and 0/1-ness of every stored value; with ``col_mask`` (a mask of
    the kept columns, or ``True`` for all of them) also, per row, whether it has a positive value in a
    kept column (see :func:`_positive_rows`), in the same read. Reads the values, and the column
    indices only when some columns are dropped."""
    scan = _Scan()
    if col_mask is None and matrix.sparse:
        data = matrix._data
        for lo in range(0, int(data.shape[0]), _SCAN_VALUES):
            scan.add(data[lo : lo + _SCAN_VALUES])
        return scan, None
    positive = np.zeros(matrix.n_rows, dtype=bool)
    mask = None if col_mask is True else col_mask
    if matrix.sparse:
        for start, stop, values in matrix.value_blocks(block_cells):
            lo, hi = int(matrix.indptr[start]), int(matrix.indptr[stop])
            scan.add(values)
            if mask is not None:  # a value in a dropped column counts as not expressed
                values = np.where(mask[np.asarray(matrix._indices[lo:hi])], values, 0)
            # a row is positive when its largest value is (fmax skips NaN, as ``> 0`` does); one
            # reduceat over the rows that store values, no cumulative count over every value
            bounds = np.asarray(matrix.indptr[start : stop + 1]) - lo
            stored = bounds[1:] > bounds[:-1]
            largest = np.zeros(stop - start, dtype=values.dtype)
            if stored.any():
                largest[stored] = np.fmax.reduceat(values, bounds[:-1][stored])
            positive[start:stop] = largest > 0
        return scan, positive if col_mask is not None else None
    for start, stop in matrix.blocks(block_cells):
        block = np.asarray(matrix.rows(start, stop))
        scan.add(block)
        positive[start:stop] = ((block if mask is None else block[:, mask]) > 0).any(axis=1)
    return scan, positive if col_mask is not None else None


def _looks_like_counts(head: np.ndarray) -> bool:
    """``prepare_anndata``'s rule on the first stored values: whole numbers, some above 1."""
    if head.size == 0:
        return False
    sample = np.asarray(head, dtype=np.float32)[:_COUNTS_SAMPLE]
    return bool(np.all(np.equal(np.mod(sample, 1), 0)) and sample.max() > 1)


@dataclass
class StreamedSource:
    """An ``.h5ad`` file checked by the first pass: how to turn any block of it into prepared rows.

    ``keep_rows``: the file's cells that are kept (not empty), ``obs`` their tidied table with unique
    names, ``notes`` every note ``prepare_anndata`` would have written, in its order.
    """

    file: H5adFile
    matrix: BlockMatrix
    name: str
    columns: Columns
    value_type: str
    transform: str  # "counts" (normalise to 1e4 + log1p), "log1p" or "none"
    keep_cols: np.ndarray | None  # column positions kept (None: all of them, in order)
    symbols: list[str]
    keep_rows: np.ndarray
    obs: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    source: dict[str, object] = field(default_factory=dict)
    block_cells: int = 10_000
    passes: int = 1

    @property
    def n_empty(self) -> int:
        return int((~self.keep_rows).sum())

    def normalise(self, block: sp.csr_matrix | np.ndarray) -> sp.csr_matrix:
        """``prepare_anndata``'s matrix steps on one block: float32, normalisation, kept columns, CSR
        without explicit zeros (rows are not dropped here: see ``keep_rows``)."""
        x = _as_float_matrix(block)
        if self.transform == "counts":
            x = normalise_counts(x)  # what prepare_anndata does to the whole matrix
        elif self.transform == "log1p":
            x = x.log1p() if sp.issparse(x) else np.log1p(x)
        if self.keep_cols is not None:
            x = x[:, self.keep_cols]
        x = sp.csr_matrix(x, dtype=np.float32)
        x.eliminate_zeros()
        return x

    def cell_data(self) -> CellData:
        """The kept cells as a ``CellData`` whose AnnData holds obs and var but no matrix: everything the
        task planning reads (labels, splits, candidate pools), nothing of the expression."""
        var = pd.DataFrame(index=pd.Index(self.symbols, name="gene_symbol"))
        adata = ad.AnnData(obs=self.obs, var=var)
        adata.obs_names = [str(n) for n in self.obs.index]
        adata.obs_names_make_unique()
        data = CellData(adata, self.name, self.columns, self.value_type, list(self.notes), self.n_empty)
        data.source = dict(self.source)
        return data


def _positive_rows(matrix: BlockMatrix, block_cells: int, col_mask: np.ndarray | None) -> np.ndarray:
    """Per row, whether any stored value in the kept columns is positive (a cell that is not empty)."""
    out = np.zeros(matrix.n_rows, dtype=bool)
    for start, stop in matrix.blocks(block_cells):
        block = matrix.rows(start, stop)
        if sp.issparse(block):
            block = sp.csr_matrix(block)
            hit = np.asarray(block.data) > 0
            if col_mask is not None:
                hit &= col_mask[block.indices]
            rows = np.repeat(np.arange(stop - start), np.diff(block.indptr))
            out[start:stop] = np.bincount(rows[hit], minlength=stop - start) > 0
        else:
            block = np.asarray(block)
            if col_mask is not None:
                block = block[:, col_mask]
            out[start:stop] = (block > 0).any(axis=1)
    return out


def _known_columns(var: pd.DataFrame, gene_symbols: str | None) -> np.ndarray | bool | None:
    """The kept columns when they are known from the var table alone (no symbol twice): all of them
    (``True``) or a mask; ``None`` when only expression totals can tell (duplicates) or the symbols are
    refused (the error is raised again, in its place, after the values are checked)."""
    try:
        symbols = _symbols(var, gene_symbols, [])
    except DataError:
        return None
    keys = [s.casefold() for s in symbols if s is not None]
    if len(set(keys)) != len(keys):
        return None
    mask = np.array([s is not None for s in symbols], dtype=bool)
    return True if mask.all() else mask


def _column_totals(source: StreamedSource) -> np.ndarray:
    """Per column, the total normalised expression over all cells (float64), for duplicate symbols."""
    totals = np.zeros(source.matrix.shape[1], dtype=np.float64)
    keep, source.keep_cols = source.keep_cols, None
    try:
        for start, stop in source.matrix.blocks(source.block_cells):
            x = source.normalise(source.matrix.rows(start, stop))
            totals += np.bincount(x.indices, weights=x.data.astype(np.float64), minlength=totals.size)
    finally:
        source.keep_cols = keep
    return totals


def _dedupe(symbols: list[str | None], totals: Callable[[], np.ndarray], notes: list[str]) -> np.ndarray:
    """``prepare_anndata``'s rule: one column per symbol (case-insensitive), the most expressed one.

    ``totals`` is called only when some symbol occurs twice.
    """
    keys = [None if s is None else s.casefold() for s in symbols]
    named = [k for k in keys if k is not None]
    if len(set(named)) == len(named):
        return np.array([j for j, k in enumerate(keys) if k is not None], dtype=np.int64)
    sums = totals()
    best: dict[str, int] = {}
    for j, key in enumerate(keys):
        if key is None:
            continue
        if key not in best or sums[j] > sums[best[key]]:
            best[key] = j
    keep = np.array(sorted(best.values()), dtype=np.int64)
    n_dup = len(named) - len(keep)
    if n_dup:
        notes.append(f"{n_dup} duplicate gene symbols: kept the most expressed column of each")
    return keep


def open_streamed(
    path: str | Path,
    columns: Columns | None,
    *,
    name: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool | None = None,
    block_cells: int = 10_000,
    check_columns: Callable[[Columns, list[str]], object] | None = None,
) -> StreamedSource:
    """Check ``path`` as ``load_dataset`` + ``prepare_anndata`` would, reading it block by block.

    Raises ``DataError`` with the same messages as the in-memory path (a CSC matrix: one more, with the
    fix). Nothing is printed: every refusal happens here, before any progress bar. ``check_columns``
    is called with the columns and every obs column name of the file before any value is read (the
    tasks' columns: a typo is refused at once, naming the columns that exist).
    """
    path = Path(path)
    file = H5adFile(path)
    try:
        if columns is not None and check_columns is not None:
            check_columns(columns, file.obs_columns())
        return _open(file, columns, name, layer, gene_symbols, allow_scaled, block_cells)
    except BaseException:
        file.close()
        raise


def _open(
    file: H5adFile,
    columns: Columns | None,
    name: str | None,
    layer: str | None,
    gene_symbols: str | None,
    allow_scaled: bool | None,
    block_cells: int,
) -> StreamedSource:
    if columns is None:
        raise DataError(
            "name the obs columns for your tasks (for example --cell-type-col cell_type); "
            f"the columns that exist are: {', '.join(file.obs_columns()) or '(none)'}"
        )
    notes: list[str] = []
    matrix = file.matrix(layer)
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise DataError(f"the dataset is empty ({matrix.shape[0]} cells x {matrix.shape[1]} genes)")
    columns.check()
    if layer is not None:
        notes.append(f"used layer {layer!r}")
    var = file.read_var()
    scan, positive = _scan(matrix, block_cells, _known_columns(var, gene_symbols))
    passes = 1
    if scan.n_bad:
        raise DataError(
            f"the expression matrix contains {scan.n_bad} NaN or infinite values; CellDuality cannot rank genes "
            "through them. Fix the file (for example replace missing values by 0 for undetected genes)."
        )
    value_type = LOG_NORMALISED
    if scan.n_values and scan.minimum < 0:
        if layer is None and file.has_raw():
            matrix = file.matrix(raw=True)
            scan, positive = _scan(matrix, block_cells, _known_columns(file.read_var(raw=True), gene_symbols))
            passes += 1
            if scan.n_bad:
                raise DataError(
                    f"adata.raw.X contains {scan.n_bad} NaN or infinite values; CellDuality cannot rank genes "
                    "through them. Fix the file (for example replace missing values by 0 for undetected genes)."
                )
            if scan.n_values and scan.minimum < 0:
                raise DataError("both .X and .raw.X hold negative values: no unscaled expression to rank")
            notes.append(".X is scaled (negative values): ranked genes from .raw instead")
            var = file.read_var(raw=True)
        elif allow_scaled:
            notes.append(
                "values are z-scores: a sentence ranks genes by how far above their population mean "
                "they are, not by absolute expression"
            )
            value_type = ZSCORE
        else:
            raise DataError(
                "the expression matrix is scaled (it has negative values) and there is no .raw to fall back "
                "on. Give CellDuality raw counts or log-normalised values: keep them in .raw before "
                "sc.pp.scale, or name a layer that holds them (--layer counts), or pass --allow-scaled "
                "(Python: allow_scaled=True) if z-scores are really what you want to rank."
            )
    transform = "none"
    if value_type == LOG_NORMALISED:
        if _looks_like_counts(matrix.head_values(_COUNTS_SAMPLE)):
            transform = "counts"
            notes.append("raw counts: normalised to 10,000 per cell and log1p-transformed")
        elif scan.n_values and scan.maximum > 50:
            transform = "log1p"
            notes.append("values look normalised but not log-transformed (max > 50): applied log1p")
        elif scan.n_values and scan.binary:
            notes.append(
                "every value is 0 or 1 (a detection or binarised matrix): taken as it is; a sentence lists the "
                "detected genes in a seeded order, since all expressed genes tie, and the rank -> expression "
                "fit carries no magnitude (R^2 = 0). Give counts or log-normalised values to rank by expression"
            )
    symbols = _symbols(var, gene_symbols, notes)
    source = StreamedSource(
        file=file,
        matrix=matrix,
        name=name or file.path.stem,
        columns=columns,
        value_type=value_type,
        transform=transform,
        keep_cols=None,
        symbols=[],
        keep_rows=np.zeros(0, dtype=bool),
        obs=pd.DataFrame(),
        block_cells=block_cells,
    )

    def totals() -> np.ndarray:
        source.passes += 1
        return _column_totals(source)

    keep_cols = _dedupe(symbols, totals, notes)
    _mouse_note([symbols[j] for j in keep_cols], notes)
    source.symbols = [str(symbols[j]) for j in keep_cols]
    if not np.array_equal(keep_cols, np.arange(matrix.shape[1])):
        source.keep_cols = keep_cols
    col_mask = None
    if source.keep_cols is not None:
        col_mask = np.zeros(matrix.shape[1], dtype=bool)
        col_mask[keep_cols] = True
    if positive is None:  # the kept columns were known only after the duplicates' totals
        positive = _positive_rows(matrix, block_cells, col_mask)
        passes += 1
    source.keep_rows = positive
    source.passes += passes
    n_empty = int((~source.keep_rows).sum())
    if n_empty:
        notes.append(f"dropped {n_empty} cells with no expressed gene")
    if not source.keep_rows.any():
        raise DataError("no cell has an expressed gene")
    wanted = [c for c in (columns.cell_type, columns.drug, columns.response, columns.perturbation) if c]
    obs = file.read_obs([*wanted, *columns.optional_columns()])
    source.obs = _tidy_obs(obs.loc[source.keep_rows], columns, notes)
    source.notes = notes
    return source
