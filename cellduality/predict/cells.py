"""A user's cells in the form a checkpoint was trained on: same preparation rules, same genes, same sentences.

The matrix choice, normalisation, gene-ID mapping and duplicate handling are ``prepare``'s own
(:func:`cellduality.data.loading.prepare_anndata`). The genes are then those of the trained dataset, in
its order: sentences rank among the genes the model was trained to read (ties broken by the same
seeded gene order), and too small an overlap is refused, because a sentence made of a few shared genes
is not a cell the model has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellduality.data.loading import prepare_anndata
from cellduality.data.schema import Columns, DataError
from cellduality.predict.checkpoint import TrainedDataset
from cellduality.sentences import Sentences, cell_sentences

POSITION = "__cellduality_position"


@dataclass
class UserCells:
    """Prepared cells over the trained genes, with where each came from in the user's AnnData."""

    adata: ad.AnnData  # log-normalised, var_names = the trained dataset's genes (its order)
    positions: np.ndarray  # row of each cell in the user's AnnData (empty cells were dropped)
    sentences: Sentences  # a sequence of symbol lists, gene indices underneath
    n_shared: int
    notes: list[str] = field(default_factory=list)


def _onto_vocabulary(
    x: sp.csr_matrix, genes: list[str], vocabulary: list[str], min_overlap: float, where: str
) -> tuple[sp.csr_matrix, int]:
    """Columns of ``x`` re-indexed onto ``vocabulary`` (absent genes are zero), matched case-insensitively."""
    index = {g.casefold(): j for j, g in enumerate(vocabulary)}
    src, dst = [], []
    for i, g in enumerate(genes):
        j = index.get(g.casefold())
        if j is not None:
            src.append(i)
            dst.append(j)
    n_shared = len(set(dst))
    if not vocabulary or n_shared < min_overlap * len(vocabulary):
        have = {g.casefold() for g in genes}
        missing = [g for g in vocabulary if g.casefold() not in have][:5]
        raise DataError(
            f"only {n_shared} of the checkpoint's {len(vocabulary)} genes ({n_shared / max(1, len(vocabulary)):.0%}) "
            f"are in {where} (missing e.g. {', '.join(missing)}); at least {min_overlap:.0%} are needed: check that "
            "var_names are gene symbols of the same species and panel (or name a symbol column with "
            "--gene-symbols), or lower --min-gene-overlap"
        )
    move = sp.csr_matrix(
        (np.ones(len(src), dtype=np.float32), (np.asarray(src), np.asarray(dst))),
        shape=(len(genes), len(vocabulary)),
    )
    return sp.csr_matrix(x @ move, dtype=np.float32), n_shared


def prepare_cells(
    adata: ad.AnnData,
    trained: TrainedDataset,
    *,
    where: str = "the data",
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool | None = None,
    min_gene_overlap: float = 0.5,
) -> UserCells:
    """Prepare ``adata`` as ``prepare`` would, over ``trained``'s genes, with its cell sentences."""
    if not 0.0 <= min_gene_overlap <= 1.0:
        raise DataError(f"min_gene_overlap must be in [0, 1], got {min_gene_overlap}")
    if adata.is_view:
        adata = adata.copy()
    if allow_scaled is None:
        allow_scaled = trained.meta.get("value_type") == "z-score"
    adata.obs[POSITION] = np.arange(adata.n_obs)
    try:
        data = prepare_anndata(
            adata,
            Columns(),
            name=trained.name,
            layer=layer,
            gene_symbols=gene_symbols,
            allow_scaled=allow_scaled,
        )
    finally:
        del adata.obs[POSITION]
    positions = data.adata.obs.pop(POSITION).to_numpy(dtype=np.int64)
    vocabulary = trained.genes
    x, n_shared = _onto_vocabulary(data.adata.X, data.genes, vocabulary, min_gene_overlap, where)
    notes = list(data.notes)
    notes.append(
        f"{n_shared} of the checkpoint's {len(vocabulary)} genes are in the data; sentences rank those"
    )
    out = ad.AnnData(
        X=x, obs=data.adata.obs, var=pd.DataFrame(index=pd.Index(vocabulary, name="gene_symbol"))
    )
    cfg = trained.config
    sentences = cell_sentences(out, top_k=max(cfg.top_k, cfg.answer_genes), seed=cfg.seed)
    return UserCells(out, positions, sentences, n_shared, notes)


def require_context(obs: pd.DataFrame, trained: TrainedDataset, where: str) -> tuple[str, ...]:
    """The context columns (cell line, donor) the trained prompts showed; the user's cells must have them."""
    context = tuple(trained.columns.context)
    missing = [c for c in context if c not in obs.columns]
    if missing:
        raise DataError(
            f"the checkpoint's prompts name the cells' {', '.join(missing)} (obs columns of its training data), "
            f"but {where} has no such column; add it (columns that exist: {', '.join(map(str, obs.columns)) or '(none)'})"
        )
    return context


__all__ = ["UserCells", "prepare_cells", "require_context"]
