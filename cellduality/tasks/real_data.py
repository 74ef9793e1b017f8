"""The real expression of a prepared folder's cells, re-read from the dataset it was prepared from.

Evaluation compares generated cells with the real test cells, and the rewards that read ground truth
(``oracle_eval``, the ``verifier_*`` rewards) compare them with the RL pool's or the SFT set's real cells;
both re-read the dataset that ``prepare`` recorded in ``meta.json`` (an embedded name, or the ``.h5ad``
path of ``meta['source']``) with the same validation and normalisation. It sits on the tasks floor, below
both of its users, because a reward must not import the evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from cellduality.data.schema import Columns, DataError
from cellduality.parsing import gene_vocabulary
from cellduality.sentences import RankExpressionFit, sentences_to_matrix

if TYPE_CHECKING:  # the data layer imports scanpy: only load_real_data needs it at run time
    from cellduality.data.loading import CellData

NAN = float("nan")


def _context_columns(meta: Mapping[str, Any]) -> Columns:
    cols = dict(meta.get("columns") or {})
    cols["context"] = tuple(cols.get("context") or ())
    return Columns(**cols)


class RealData:
    """Real log-normalised expression of the prepared dataset's cells, looked up by ``cell_id``.

    Columns follow ``meta['genes']`` (the vocabulary generated sentences are mapped onto), so a
    reconstructed cell and a real one are vectors over the same genes.
    """

    def __init__(self, data: CellData, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)
        self.genes: list[str] = [str(g) for g in meta.get("genes") or data.genes]
        self.fit = RankExpressionFit.from_dict(meta["fit"])
        self.vocabulary = gene_vocabulary(self.genes)
        self.columns = _context_columns(meta) if meta.get("columns") else data.columns
        x = sp.csr_matrix(data.adata.X, dtype=np.float32)
        if data.genes != self.genes:
            pos = {g: j for j, g in enumerate(data.genes)}
            missing = [g for g in self.genes if g not in pos]
            if missing:
                raise DataError(
                    f"the dataset read for evaluation lacks {len(missing)} genes of the prepared examples "
                    f"(e.g. {missing[:5]}): pass the same file and options that `cellduality prepare` used"
                )
            x = x[:, [pos[g] for g in self.genes]]
        self.x = x
        self.obs = data.adata.obs
        self._index = {str(n): i for i, n in enumerate(data.adata.obs_names)}
        self._contexts: np.ndarray | None = None

    def positions(self, cell_ids: Sequence[str]) -> np.ndarray:
        """Row positions of ``cell_ids``; a cell the dataset lacks is an error naming it."""
        out = np.empty(len(cell_ids), dtype=np.int64)
        for i, cid in enumerate(cell_ids):
            pos = self._index.get(str(cid))
            if pos is None:
                raise DataError(
                    f"cell {cid!r} of the prepared examples is not in the dataset read for evaluation; "
                    "evaluate against the dataset the examples were prepared from"
                )
            out[i] = pos
        return out

    def expression(self, cell_ids: Sequence[str]) -> sp.csr_matrix:
        return self.x[self.positions(cell_ids)]

    def dense(self, cell_ids: Sequence[str]) -> np.ndarray:
        return self.expression(cell_ids).toarray()

    def contexts(self) -> np.ndarray:
        """Per cell, its context text exactly as the task builders wrote it (``cell type: k562``)."""
        if self._contexts is None:
            from cellduality.tasks.classification import context_text

            cols = list(self.columns.context)
            if not cols:
                self._contexts = np.full(len(self.obs), "", dtype=object)
            else:
                keys = self.obs[cols].astype(str).agg("\x1f".join, axis=1).to_numpy()
                first = {k: i for i, k in reversed(list(enumerate(keys)))}
                text = {k: context_text(self.obs.iloc[i], cols) for k, i in first.items()}
                self._contexts = np.asarray([text[k] for k in keys], dtype=object)
        return self._contexts

    def control_positions(self, context: str | None = None) -> np.ndarray:
        """Control cells (perturbation column == control value), of one context when given and present."""
        col = self.columns.perturbation
        if not col or col not in self.obs.columns:
            raise DataError("the dataset has no perturbation column: no control cells to compare with")
        is_control = self.obs[col].astype(str).to_numpy() == str(self.columns.control_value)
        if context is not None:
            same = is_control & (self.contexts() == context)
            if same.any():
                return np.flatnonzero(same)
        return np.flatnonzero(is_control)

    def observed_change(
        self, cell_ids: Sequence[str], context: str | None, n_de: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ground truth of a perturbation from real cells: the control mean of its context (all
        controls when the context has none), the observed mean delta of ``cell_ids`` from it, and the
        ``n_de`` genes that change most. One place for what the ground-truth rewards (``oracle_eval``,
        the verifiers) compare a predicted cell against."""
        from cellduality.metrics.arrays import mean_profile
        from cellduality.metrics.perturbation import de_gene_indices

        control = mean_profile(self.x[self.control_positions(context or None)])
        delta = mean_profile(self.expression(cell_ids)) - control
        return control, delta, de_gene_indices(delta, n_de)

    def reconstruct(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """Expression of sentences via the rank fit; an empty sentence (invalid output) is a ``nan`` row."""
        out = np.full((len(sentences), len(self.genes)), NAN)
        valid = [i for i, s in enumerate(sentences) if len(s)]
        if valid:
            out[valid] = sentences_to_matrix([sentences[i] for i in valid], self.genes, self.fit)
        return out


def load_real_data(
    meta: Mapping[str, Any],
    data_path: str | Path | None = None,
    *,
    layer: str | None = None,
    gene_symbols: str | None = None,
) -> RealData:
    """Re-read the dataset the prepared examples came from: embedded (``meta['dataset']``), or a file.

    The file is validated and normalised exactly as ``cellduality prepare`` did, with the columns stored
    in the prepared meta. Why the arguments default to the meta: a prepared folder records where its
    data came from and how it was read (``meta['source']``: path, layer, gene-symbol column), so that
    evaluation and the ground-truth rewards need not be told again what ``prepare`` was told.
    ``data_path`` / ``layer`` / ``gene_symbols`` given here win over the recorded ones (the file moved,
    or it is read another way).
    """
    from cellduality.data.embedded import EMBEDDED, load_dataset
    from cellduality.data.loading import ZSCORE

    name = str(meta.get("dataset", ""))
    allow_scaled = meta.get("value_type") == ZSCORE
    source = _source(meta)
    layer = layer if layer is not None else source.get("layer")
    gene_symbols = gene_symbols if gene_symbols is not None else source.get("gene_symbols")
    if data_path is None:
        data_path = recorded_source(meta)
        if data_path is not None and not Path(data_path).exists():
            raise DataError(
                f"the examples were prepared from {data_path}, which no longer exists; pass the file's "
                "new place (--data PATH)"
            )
    if data_path is not None:
        data = load_dataset(
            str(data_path),
            _context_columns(meta),
            name=name or None,
            layer=layer,
            gene_symbols=gene_symbols,
            allow_scaled=allow_scaled,
        )
    elif name in EMBEDDED:
        data = load_dataset(name, layer=layer, gene_symbols=gene_symbols)
    else:
        raise DataError(
            f"the examples were prepared from {name!r}, which is not an embedded dataset and whose file "
            "the prepared folder does not record; pass the .h5ad it came from (--data PATH) so generated "
            "cells can be compared with the real ones"
        )
    return RealData(data, meta)


def _source(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """How ``prepare`` read the data (``meta['source']``: path, layer, gene-symbol column); empty for a
    folder prepared before it was recorded."""
    source = meta.get("source")
    return source if isinstance(source, Mapping) else {}


def recorded_source(meta: Mapping[str, Any]) -> str | None:
    """The ``.h5ad`` path ``prepare`` recorded for a user's file; ``None`` for an embedded dataset (which is
    re-read by its name) or when no path was recorded."""
    from cellduality.data.embedded import EMBEDDED

    path = _source(meta).get("path")
    return str(path) if path and meta.get("dataset") not in EMBEDDED else None


__all__ = ["RealData", "load_real_data", "recorded_source"]
