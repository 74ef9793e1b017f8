"""An ``.h5ad`` file read in blocks of cells, never whole: the input side of the block-wise ``prepare``.

An atlas of 10^6-10^7 cells does not fit in memory, so its expression matrix stays on disk (h5py, the
store anndata's backed mode uses) and is read as row blocks of its CSR layout (``anndata.io.sparse_dataset``)
or of a dense 2-D dataset. Only what every later step needs whole is read whole: the var table and
the obs columns the tasks name (``anndata.io.read_elem``, so their dtypes are what ``read_h5ad`` gives).
A layout that cannot be read by rows (CSC) is refused with the fix, not read column by column.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from cellduality.data.schema import DataError


class BlockMatrix:
    """One matrix of the file (``X``, a layer or ``raw/X``), read by rows.

    ``rows(start, stop)`` returns a scipy CSR matrix (sparse files) or a numpy array (dense files), in
    the file's dtype, exactly what the same rows of ``read_h5ad``'s matrix hold.
    """

    def __init__(self, elem: h5py.Group | h5py.Dataset, where: str, path: Path) -> None:
        self.where = where
        encoding = str(elem.attrs.get("encoding-type", ""))
        if isinstance(elem, h5py.Dataset):
            if elem.ndim != 2:
                raise DataError(f"{path}: {where} is a {elem.ndim}-D array, not a cells x genes matrix")
            self.sparse = False
            self._dense = elem
            self.shape = (int(elem.shape[0]), int(elem.shape[1]))
            return
        if encoding == "csc_matrix":
            raise DataError(
                f"{path}: {where} is stored column by column (CSC), so reading it by cells would read the whole "
                "file for every block: write it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...)) or "
                "pass --in-memory"
            )
        if encoding != "csr_matrix":
            raise DataError(
                f"{path}: {where} has the layout {encoding or 'unknown'!r}, which the block-wise reader does not "
                "read (it reads CSR and dense matrices): pass --in-memory"
            )
        self.sparse = True
        self._csr = sparse_dataset(elem)
        self._data = elem["data"]
        self._indices = elem["indices"]
        self.indptr = np.asarray(elem["indptr"][...], dtype=np.int64)
        self.shape = tuple(int(s) for s in self._csr.shape)

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    def rows(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows ``start:stop`` as they are stored (CSR or dense), one contiguous read."""
        if self.sparse:
            return self._csr[start:stop]
        return np.asarray(self._dense[start:stop])

    def take(self, rows: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """The given rows (sorted, distinct), stacked in that order: a seeded subsample."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32) if self.sparse else np.zeros((0, 0))
        # runs of consecutive rows are read at once
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        parts = [self.rows(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]
        return sp.vstack(parts, format="csr") if self.sparse else np.vstack(parts)

    def value_blocks(self, block_cells: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, values)`` for each block of :meth:`blocks` of a CSR matrix: the rows' stored
        values (its ``data``) as stored, each array valid until the next is yielded.

        They are read into one buffer the size of the largest block: a pass over a 10^6-cell file reads
        4 GB of values, and a new array per block pays its page faults again (two thirds of the reading
        time, measured on such a file).
        """
        bounds = [
            (start, stop, int(self.indptr[start]), int(self.indptr[stop]))
            for start, stop in self.blocks(block_cells)
        ]
        buffer = np.empty(max((hi - lo for *_, lo, hi in bounds), default=0), dtype=self._data.dtype)
        for start, stop, lo, hi in bounds:
            if hi > lo:
                self._data.read_direct(buffer, np.s_[lo:hi], np.s_[0 : hi - lo])
            yield start, stop, buffer[: hi - lo]

    def head_values(self, n: int) -> np.ndarray:
        """The first ``n`` stored values (CSR ``data``; a dense matrix row-major, zeros included)."""
        if self.sparse:
            return np.asarray(self._data[: min(n, self._data.shape[0])])
        n_rows = min(self.shape[0], max(1, -(-n // max(1, self.shape[1]))))
        return np.asarray(self._dense[:n_rows]).ravel()[:n]

    def blocks(self, block_cells: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of consecutive row blocks of at most ``block_cells`` rows."""
        for start in range(0, self.n_rows, block_cells):
            yield start, min(start + block_cells, self.n_rows)


class H5adFile:
    """An open ``.h5ad`` file: its obs and var tables on demand, its matrices as :class:`BlockMatrix`."""

    def __init__(self, path: str | Path) -> None:
        from cellduality.data.loading import check_h5ad_path, unreadable_h5ad

        self.path = check_h5ad_path(path)  # the in-memory path's errors for a missing file or a folder
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            raise unreadable_h5ad(self.path, exc) from exc
        for key in ("obs", "var"):
            if key not in self._file:
                self.close()
                raise DataError(f"{self.path} has no {key!r} table: it is not an AnnData .h5ad file")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> H5adFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------
    # tables

    def obs_columns(self) -> list[str]:
        """Every obs column name, in the file's order (what error messages list)."""
        order = self._file["obs"].attrs.get("column-order", [])
        return [str(c) for c in np.atleast_1d(order)] if len(order) else []

    def _index(self, group: h5py.Group) -> pd.Index:
        name = str(group.attrs.get("_index", "_index"))
        values = read_elem(group[name])
        return pd.Index(np.asarray(values, dtype=object).astype(str), name=None if name == "_index" else name)

    def n_obs(self) -> int:
        group = self._file["obs"]
        return int(group[str(group.attrs.get("_index", "_index"))].shape[0])

    def read_obs(self, columns: Sequence[str]) -> pd.DataFrame:
        """The obs table restricted to ``columns`` (those that exist), indexed by the cell names."""
        group = self._file["obs"]
        present = [c for c in dict.fromkeys(columns) if c in self.obs_columns()]
        data = {c: read_elem(group[c]) for c in present}
        return pd.DataFrame(data, index=self._index(group))

    def read_var(self, raw: bool = False) -> pd.DataFrame:
        """The var table of ``X`` (or of ``raw/X``), whole: one row per gene."""
        return read_elem(self._file["raw/var" if raw else "var"])

    def has_raw(self) -> bool:
        return "raw" in self._file and "X" in self._file["raw"]

    def layers(self) -> list[str]:
        return list(self._file["layers"].keys()) if "layers" in self._file else []

    def matrix(self, layer: str | None = None, raw: bool = False) -> BlockMatrix:
        """``X``, ``layers/<layer>`` or ``raw/X`` as a :class:`BlockMatrix`."""
        if raw:
            return BlockMatrix(self._file["raw/X"], "raw/X", self.path)
        if layer is not None:
            if layer not in self.layers():
                raise DataError(
                    f"layer {layer!r} not found; layers present: {', '.join(self.layers()) or '(none)'}"
                )
            return BlockMatrix(self._file["layers"][layer], f"layer {layer!r}", self.path)
        if "X" not in self._file:
            raise DataError("the AnnData has no expression matrix (.X is empty)")
        return BlockMatrix(self._file["X"], "X", self.path)
