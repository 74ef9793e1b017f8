"""Read, validate and normalise single-cell data into the form every other part relies on.

After ``prepare_anndata`` the matrix is log-normalised (or explicitly flagged as z-scores), float32
CSR, with unique gene symbols as ``var_names`` and no empty cell. Every fix applied is recorded in
``CellData.notes`` and every refusal raises ``DataError`` with the fix in its message: a model trained
on silently wrong ranks is worse than no model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellduality.data.genes import detect_id_type, map_to_symbols
from cellduality.data.normalise import normalise_counts
from cellduality.data.perturbations import label_text, read_perturbations
from cellduality.data.schema import Columns, DataError

LOG_NORMALISED = "log-normalised"
ZSCORE = "z-score"
#: var columns that hold gene symbols in common file layouts (CELLxGENE: ``feature_name``), in the
#: order they are tried when var_names hold IDs.
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "feature_name", "symbol", "gene_name", "gene_names")
#: a mouse-style symbol: capital first letter, then no capital and at least one lower-case letter (Cd74)
_MOUSE_SYMBOL = re.compile(r"^[A-Z](?=[^A-Z]*[a-z])[a-z0-9.\-]*$")


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


#: values above which :func:`_extremes` splits the reductions over threads (numpy releases the GIL)
_PARALLEL_VALUES = 4_000_000


def _extremes(values: np.ndarray) -> tuple[np.floating, np.floating]:
    """``values.min(), values.max()``; a large 1-D array's halves reduced on two threads at once."""
    threads = min(os.cpu_count() or 1, 8)
    if values.size < _PARALLEL_VALUES or threads < 2 or values.ndim != 1:
        return values.min(), values.max()
    from concurrent.futures import ThreadPoolExecutor

    parts = [part for part in np.array_split(values, threads) if part.size]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        found = list(pool.map(lambda part: (part.min(), part.max()), parts))
    # numpy's min and max propagate a NaN of either half (Python's min would drop it by argument order)
    return np.min([lo for lo, _ in found]), np.max([hi for _, hi in found])


def finite_range(values: np.ndarray) -> tuple[int, float, float]:
    """How many of ``values`` are NaN or infinite, and the minimum and maximum of the others
    (``inf``, ``-inf`` when there are none).

    Two reductions when every value is finite, the usual case: ``min`` and ``max`` propagate a NaN and
    reach an infinity, so finite extremes prove that no value is NaN or infinite, and no mask of the
    matrix's size is built (a third of the time of ``cell_sentences`` went to that mask and its count).
    """
    if values.size == 0:
        return 0, np.inf, -np.inf
    lo, hi = _extremes(values)
    if np.isfinite(lo) and np.isfinite(hi):
        return 0, float(lo), float(hi)
    finite = np.isfinite(values)
    n_bad = int(values.size - np.count_nonzero(finite))
    kept = values[finite]
    if kept.size == 0:
        return n_bad, np.inf, -np.inf
    return n_bad, float(kept.min()), float(kept.max())


def _check_finite(x, where: str) -> float:
    """Refuse NaN or infinite values; the smallest value (``inf`` for a matrix without values)."""
    n_bad, lo, _ = finite_range(_values(x))
    if n_bad:
        raise DataError(
            f"{where} contains {n_bad} NaN or infinite values; CellDuality cannot rank genes "
            "through them. Fix the file (for example replace missing values by 0 for undetected genes)."
        )
    return lo


def _looks_like_counts(x) -> bool:
    values = _values(x)
    if values.size == 0:
        return False
    sample = values[: min(values.size, 200_000)]
    return bool(np.all(np.equal(np.mod(sample, 1), 0)) and sample.max() > 1)


def _stored_matrix(adata: ad.AnnData, layer: str | None) -> tuple:
    """``.X`` or ``layer`` as float32 (no copy when it is already), and the var table; values unchecked."""
    if layer is not None:
        if layer not in adata.layers:
            raise DataError(
                f"layer {layer!r} not found; layers present: {', '.join(adata.layers.keys()) or '(none)'}"
            )
        x, var = adata.layers[layer], adata.var
    else:
        x, var = adata.X, adata.var
    if x is None:
        raise DataError("the AnnData has no expression matrix (.X is empty)")
    return _as_float_matrix(x), var


def _pick_matrix(adata: ad.AnnData, layer: str | None, allow_scaled: bool, notes: list[str]) -> tuple:
    """The matrix to rank and its var table, refusing scaled data unless ``.raw`` can stand in."""
    x, var = _stored_matrix(adata, layer)
    if layer is not None:
        notes.append(f"used layer {layer!r}")
    if _check_finite(x, "the expression matrix") < 0:
        if layer is None and adata.raw is not None:
            raw = _as_float_matrix(adata.raw.X)
            if _check_finite(raw, "adata.raw.X") < 0:
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
            "sc.pp.scale, or name a layer that holds them (--layer counts), or pass --allow-scaled "
            "(Python: allow_scaled=True) if z-scores are really what you want to rank."
        )
    return x, var.copy(), LOG_NORMALISED


def _normalise(x, notes: list[str]):
    """Raw counts -> total-count normalisation + log1p; un-logged normalised values -> log1p."""
    if _looks_like_counts(x):
        notes.append("raw counts: normalised to 10,000 per cell and log1p-transformed")
        return normalise_counts(x)
    values = _values(x)
    if values.size and values.max() > 50:
        notes.append("values look normalised but not log-transformed (max > 50): applied log1p")
        return x.log1p() if sp.issparse(x) else np.log1p(x)
    if values.size and np.isin(values, (0.0, 1.0)).all():
        notes.append(
            "every value is 0 or 1 (a detection or binarised matrix): taken as it is; a sentence lists the "
            "detected genes in a seeded order, since all expressed genes tie, and the rank -> expression "
            "fit carries no magnitude (R^2 = 0). Give counts or log-normalised values to rank by expression"
        )
    return x


def _looks_like_symbols(values: list[str]) -> bool:
    sample = [v for v in values[:2000] if v]
    return bool(sample) and detect_id_type(sample) == "symbol"


def _mouse_note(symbols: list[str | None], notes: list[str]) -> None:
    """Say so when the symbols look like mouse ones (``Cd74``): the offline resources are human-only."""
    sample = [s for s in symbols if s][:2000]
    if not sample:
        return
    mouse = sum(bool(_MOUSE_SYMBOL.match(s)) for s in sample)
    human = sum(s.upper() == s and any(c.isalpha() for c in s) for s in sample)
    if mouse >= 0.5 * len(sample) and mouse > human:
        examples = ", ".join(s for s in sample if _MOUSE_SYMBOL.match(s))
        examples = ", ".join(examples.split(", ")[:3])
        notes.append(
            f"gene symbols look like mouse symbols ({examples}, ...): cell sentences work as they are, but "
            "the offline gene-ID tables (GENCODE v44 / HGNC), the GO graph and the PROGENy pathways used by "
            "the GO baseline and the verifier rewards are human-only and will match few of these genes"
        )


def _symbols(var: pd.DataFrame, gene_symbols: str | None, notes: list[str]) -> list[str | None]:
    """Gene symbols for the var table: a named column, the index, or (IDs in the index) a symbol column
    found automatically (``feature_name`` in CELLxGENE files), else the IDs mapped with offline tables."""
    if gene_symbols is not None:
        if gene_symbols not in var.columns:
            raise DataError(
                f"gene symbol column {gene_symbols!r} is not in adata.var; columns that exist: "
                f"{', '.join(map(str, var.columns)) or '(none)'}"
            )
        notes.append(f"gene symbols from var[{gene_symbols!r}]")
        return [None if pd.isna(s) or str(s).strip() == "" else str(s).strip() for s in var[gene_symbols]]
    names = [str(n) for n in var.index]
    id_type = detect_id_type(names)
    if id_type == "symbol":
        return names
    for column in SYMBOL_COLUMNS:
        if column in var.columns:
            values = ["" if pd.isna(v) else str(v).strip() for v in var[column]]
            if _looks_like_symbols(values) and sum(bool(v) for v in values) >= 0.5 * len(values):
                notes.append(
                    f"var_names hold {id_type} IDs: gene symbols taken from var[{column!r}] "
                    "(pass --gene-symbols COLUMN to choose another column)"
                )
                return [v or None for v in values]
    mapped = map_to_symbols(names, id_type)
    n_ok = sum(m is not None for m in mapped)
    if n_ok < 0.5 * len(names):
        mouse = id_type == "ensembl" and np.mean([n.startswith("ENSMUSG") for n in names[:2000]]) > 0.5
        what = (
            "mouse Ensembl IDs (ENSMUSG...), which the human-only offline tables cannot map"
            if mouse
            else (
                f"{id_type} IDs but only {n_ok}/{len(names)} map to a symbol with the offline tables "
                "(human GENCODE v44 / HGNC)"
            )
        )
        raise DataError(
            f"var_names look like {what}. Name a var column that holds symbols "
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


def _tidy_obs(obs: pd.DataFrame, columns: Columns, notes: list[str]) -> pd.DataFrame:
    """Label columns as clean strings: missing values as ``""``, perturbations in canonical form.

    Cells whose *label* is missing are dropped by each task that needs the label (with a note there);
    a missing direction, dose or context value is left out of the prompt, said here.
    """
    obs = obs.copy()
    for column in (columns.cell_type, columns.drug, columns.response):
        if column and column in obs.columns:
            obs[column] = label_text(obs[column])[0]
    pert = columns.perturbation
    perturbed = np.ones(len(obs), dtype=bool)  # cells whose prompt names a perturbation
    if pert and pert in obs.columns:
        reading = read_perturbations(
            obs[pert], str(columns.control_value), columns.combo_sep, columns.perturbation_kind
        )
        obs[pert] = reading.conditions
        perturbed = ~reading.is_control & ~reading.missing
        notes.append(reading.note(pert, columns.combo_sep, columns.perturbation_kind))
    for column in columns.optional_columns():
        if column in obs.columns:
            text, missing = label_text(obs[column])
            obs[column] = text
            if column in (columns.direction, columns.dose):
                missing &= perturbed  # a control cell has no dose or direction, by design
            if missing.any():
                what = {
                    columns.direction: f"--default-direction ({columns.default_direction!r}) is used"
                }.get(column, "it is left out of their prompts")
                notes.append(f"{int(missing.sum())} cells have no value in {column!r} (NaN or blank): {what}")
    from cellduality.data.labels import check_labels

    check_labels(obs, columns)  # labels no completion can name right (both prepare paths come here)
    return obs


def pick_expression(
    adata: ad.AnnData, layer: str | None = None, allow_scaled: bool = False, notes: list[str] | None = None
) -> tuple:
    """The matrix CellDuality ranks, its var table and value type, by the rules of ``prepare``.

    ``.X`` (or ``layer``); a scaled matrix (negative values) is replaced by ``.raw`` when it exists, else
    refused unless ``allow_scaled``; NaN or infinite values are refused. What was done goes to ``notes``.
    """
    if adata.isbacked:
        adata = adata.to_memory()
    return _pick_matrix(adata, layer, allow_scaled, notes if notes is not None else [])


def expression_matrix(adata: ad.AnnData, layer: str | None = None) -> tuple:
    """``.X`` (or ``layer``) as float32, and the var table, before :func:`pick_expression`'s checks.

    For a caller that reads every value anyway (``cell_sentences``' compiled kernel): when each is
    finite and none is negative, ``pick_expression`` returns this same matrix; otherwise its rules
    (``.raw`` for a scaled matrix, refusals) apply and the caller must go through it.
    """
    if adata.isbacked:
        adata = adata.to_memory()
    return _stored_matrix(adata, layer)


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
    notes: list[str] = []
    if adata.isbacked:  # h5py-backed: nothing below can read a matrix it does not hold in memory
        adata = adata.to_memory()
        notes.append("the AnnData was opened backed (on disk): read into memory")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(f"the dataset is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    columns.check()
    x, var, value_type = _pick_matrix(adata, layer, allow_scaled, notes)
    if value_type == LOG_NORMALISED:
        x = _normalise(x, notes)
    symbols = _symbols(var, gene_symbols, notes)
    x, symbols = _deduplicate(x, symbols, notes)
    _mouse_note(symbols, notes)
    x = sp.csr_matrix(x, dtype=np.float32)
    x.eliminate_zeros()
    expressed = np.diff(x.indptr) if value_type == LOG_NORMALISED else (x > 0).sum(axis=1).A1
    keep = np.asarray(expressed) > 0
    n_empty = int((~keep).sum())
    if n_empty:
        notes.append(f"dropped {n_empty} cells with no expressed gene")
    if not keep.any():
        raise DataError("no cell has an expressed gene")
    obs = _tidy_obs(adata.obs.loc[keep], columns, notes)
    out = ad.AnnData(X=x[keep], obs=obs, var=pd.DataFrame(index=pd.Index(symbols, name="gene_symbol")))
    out.obs_names = [str(n) for n in obs.index]
    out.obs_names_make_unique()
    return CellData(out, name, columns, value_type, notes, n_empty)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_h5ad(path: str | Path, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file with a one-line error when it is missing, a folder or not an ``.h5ad``."""
    p = check_h5ad_path(path)
    if p.suffix.lower() != ".h5ad":
        suffix = p.suffix or "(no suffix)"
        try:
            return ad.read_h5ad(p, backed="r" if backed else None)
        except Exception as exc:
            raise DataError(
                f"{p} ({suffix}) could not be read as .h5ad ({_first_line(exc)}); CellDuality reads .h5ad "
                "files: convert it with scanpy first (sc.read_csv / sc.read_loom / sc.read_10x_h5 ... then "
                ".write_h5ad)"
            ) from exc
    try:
        return ad.read_h5ad(p, backed="r" if backed else None)
    except Exception as exc:  # anndata and h5py raise many types, over several lines, for a bad file
        raise unreadable_h5ad(p, exc) from exc


def unreadable_h5ad(path: Path, exc: BaseException) -> DataError:
    """The one-line error for an ``.h5ad`` that cannot be read (damaged, truncated, not HDF5)."""
    return DataError(
        f"{path} could not be read as .h5ad: {_first_line(exc)} (a damaged or truncated file? write it "
        "again with adata.write_h5ad)"
    )


def check_h5ad_path(path: str | Path) -> Path:
    """``path`` as a file to read, or a one-line error: missing, a folder (a prepared folder and a 10x
    folder are named as such)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file: {p}")
    if p.is_dir():
        if (p / "meta.json").is_file():
            raise DataError(
                f"{p} is a prepared folder (written by `cellduality prepare`), not an .h5ad file: give it to "
                "sft-data, eval or training as it is, or give prepare the .h5ad it was made from"
            )
        if any((p / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz")):
            raise DataError(
                f"{p} is a 10x folder (matrix.mtx), not an .h5ad file: convert it first, e.g. "
                "scanpy.read_10x_mtx(folder).write_h5ad('cells.h5ad')"
            )
        found = sorted(f.name for f in p.glob("*.h5ad"))[:5]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise DataError(f"{p} is a folder, not an .h5ad file{hint}: pass the path of one .h5ad file")
    return p
