"""Read, validate and normalise single-cell data into the form every other part relies on.

After ``prepare_anndata`` the matrix is log-normalised (or explicitly flagged as z-scores), float32
CSR, with unique gene symbols as ``var_names`` and no empty cell. Every fix applied is recorded in
``CellData.notes`` and every refusal raises ``DataError`` with the fix in its message: a model trained
on silently wrong ranks is worse than no model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp

from cellduality.data.genes import detect_id_type, map_to_symbols
from cellduality.data.schema import Columns, DataError

LOG_NORMALISED = "log-normalised"
ZSCORE = "z-score"
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "feature_name", "symbol", "gene_name")


@dataclass
class CellData:
    """A validated dataset: the AnnData, its column names and what was done to it."""

    adata: ad.AnnData
    name: str
    columns: Columns
    value_type: str = LOG_NORMALISED
    notes: list[str] = field(default_factory=list)
    n_empty_dropped: int = 0
    #: how it was loaded (source name or path, layer, gene symbol column): enough to load it again
    source: dict[str, object] = field(default_factory=dict)

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.adata.var_names]


def _as_float_matrix(x) -> sp.csr_matrix | np.ndarray:
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float32)
    return np.asarray(x, dtype=np.float32)


def _values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else np.asarray(x).ravel()


def _check_finite(x, where: str) -> None:
    values = _values(x)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(
            f"{where} contains {int(bad.sum())} NaN or infinite values; CellDuality cannot rank genes "
            "through them. Fix the file (for example replace missing values by 0 for undetected genes)."
        )


def _looks_like_counts(x) -> bool:
    values = _values(x)
    if values.size == 0:
        return False
    sample = values[: min(values.size, 200_000)]
    return bool(np.all(np.equal(np.mod(sample, 1), 0)) and sample.max() > 1)


def _pick_matrix(adata: ad.AnnData, layer: str | None, allow_scaled: bool, notes: list[str]) -> tuple:
    """The matrix to rank and its var table, refusing scaled data unless ``.raw`` can stand in."""
    if layer is not None:
        if layer not in adata.layers:
            raise DataError(
                f"layer {layer!r} not found; layers present: {', '.join(adata.layers.keys()) or '(none)'}"
            )
        x, var = adata.layers[layer], adata.var
        notes.append(f"used layer {layer!r}")
    else:
        x, var = adata.X, adata.var
    if x is None:
        raise DataError("the AnnData has no expression matrix (.X is empty)")
    x = _as_float_matrix(x)
    _check_finite(x, "the expression matrix")
    if _values(x).size and _values(x).min() < 0:
        if layer is None and adata.raw is not None:
            raw = _as_float_matrix(adata.raw.X)
            _check_finite(raw, "adata.raw.X")
            if _values(raw).size and _values(raw).min() < 0:
                raise DataError("both .X and .raw.X hold negative values: no unscaled expression to rank")
            notes.append(".X is scaled (negative values): ranked genes from .raw instead")
            return raw, adata.raw.var.copy(), LOG_NORMALISED
        if allow_scaled:
            notes.append(
                "values are z-scores: a sentence ranks genes by how far above their population mean "
                "they are, not by absolute expression"
            )
            return x, var.copy(), ZSCORE
        raise DataError(
            "the expression matrix is scaled (it has negative values) and there is no .raw to fall back "
            "on. Give CellDuality raw counts or log-normalised values: keep them in .raw before "
            "sc.pp.scale, or name a layer that holds them (--layer counts), or pass allow_scaled=True "
            "if z-scores are really what you want to rank."
        )
    return x, var.copy(), LOG_NORMALISED


def _normalise(x, notes: list[str]):
    """Raw counts -> total-count normalisation + log1p; un-logged normalised values -> log1p."""
    if _looks_like_counts(x):
        tmp = ad.AnnData(x)
        sc.pp.normalize_total(tmp, target_sum=1e4)
        sc.pp.log1p(tmp)
        notes.append("raw counts: normalised to 10,000 per cell and log1p-transformed")
        return _as_float_matrix(tmp.X)
    values = _values(x)
    if values.size and values.max() > 50:
        notes.append("values look normalised but not log-transformed (max > 50): applied log1p")
        return x.log1p() if sp.issparse(x) else np.log1p(x)
    return x


def _symbols(var: pd.DataFrame, gene_symbols: str | None, notes: list[str]) -> list[str | None]:
    """Gene symbols for the var table: a named column, or the index (mapped if it holds IDs)."""
    if gene_symbols is not None:
        if gene_symbols not in var.columns:
            raise DataError(
                f"gene symbol column {gene_symbols!r} is not in adata.var; columns that exist: "
                f"{', '.join(map(str, var.columns)) or '(none)'}"
            )
        notes.append(f"gene symbols from var[{gene_symbols!r}]")
        return [None if pd.isna(s) or str(s) == "" else str(s) for s in var[gene_symbols]]
    names = [str(n) for n in var.index]
    id_type = detect_id_type(names)
    if id_type == "symbol":
        return names
    mapped = map_to_symbols(names, id_type)
    n_ok = sum(m is not None for m in mapped)
    if n_ok < 0.5 * len(names):
        raise DataError(
            f"var_names look like {id_type} IDs but only {n_ok}/{len(names)} map to a symbol with the "
            "offline tables (human GENCODE v44 / HGNC). Name a var column that holds symbols "
            f"(--gene-symbols COLUMN; columns that exist: {', '.join(map(str, var.columns)) or '(none)'})."
        )
    notes.append(f"mapped {n_ok}/{len(names)} {id_type} IDs to gene symbols; dropped the rest")
    return mapped


def _deduplicate(x, symbols: list[str | None], notes: list[str]) -> tuple:
    """Keep one column per symbol (case-insensitive): the one with the largest total expression."""
    totals = np.asarray(x.sum(axis=0)).ravel()
    best: dict[str, int] = {}
    for j, s in enumerate(symbols):
        if s is None:
            continue
        key = s.casefold()
        if key not in best or totals[j] > totals[best[key]]:
            best[key] = j
    keep = np.array(sorted(best.values()), dtype=np.int64)
    n_dup = sum(s is not None for s in symbols) - len(keep)
    if n_dup:
        notes.append(f"{n_dup} duplicate gene symbols: kept the most expressed column of each")
    return x[:, keep], [symbols[j] for j in keep]


def prepare_anndata(
    adata: ad.AnnData,
    columns: Columns,
    *,
    name: str = "dataset",
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool = False,
) -> CellData:
    """Validate and normalise ``adata`` for cell sentences; returns a new ``CellData``."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"the dataset is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    notes: list[str] = []
    x, var, value_type = _pick_matrix(adata, layer, allow_scaled, notes)
    if value_type == LOG_NORMALISED:
        x = _normalise(x, notes)
    symbols = _symbols(var, gene_symbols, notes)
    x, symbols = _deduplicate(x, symbols, notes)
    x = sp.csr_matrix(x, dtype=np.float32)
    x.eliminate_zeros()
    expressed = np.diff(x.indptr) if value_type == LOG_NORMALISED else (x > 0).sum(axis=1).A1
    keep = np.asarray(expressed) > 0
    n_empty = int((~keep).sum())
    if n_empty:
        notes.append(f"dropped {n_empty} cells with no expressed gene")
    if not keep.any():
        raise DataError("no cell has an expressed gene")
    obs = adata.obs.loc[keep].copy()
    out = ad.AnnData(X=x[keep], obs=obs, var=pd.DataFrame(index=pd.Index(symbols, name="gene_symbol")))
    out.obs_names = [str(n) for n in obs.index]
    out.obs_names_make_unique()
    return CellData(out, name, columns, value_type, notes, n_empty)


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an ``.h5ad`` file with a clear error when it is missing or not one."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file: {p}")
    try:
        return ad.read_h5ad(p)
    except Exception as exc:  # anndata raises many types for a bad file
        raise DataError(f"{p} could not be read as .h5ad: {exc}") from exc
