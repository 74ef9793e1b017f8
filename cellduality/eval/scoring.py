"""Completions -> predictions -> metrics, per task, with the metric functions of :mod:`.metrics`.

A model and a baseline are scored by the same code once their output is in the same form: a label per
example (classification), a gene sentence per example (generation, perturbation), or a mean profile per
perturbation (the perturbation baselines). Generated sentences become expression with the dataset's own
rank -> expression fit (``meta['fit']``), and are compared with the *real* log-normalised expression of
the test cells, re-read from the dataset the examples were built from (:func:`load_real_data`).

Nothing here raises on bad model output: an unparsable completion is an invalid prediction (a ``None``
label, an empty sentence, a row of ``nan`` expression), which the metrics count as a miss or leave out,
and the valid-output and format rates say how often it happened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from cellduality.data.schema import Columns, DataError
from cellduality.eval import metrics as m
from cellduality.parsing import gene_vocabulary, parse_genes, parse_label
from cellduality.sentences import RankExpressionFit, sentences_to_matrix

if TYPE_CHECKING:  # the data layer imports scanpy: only load_real_data needs it at run time
    from cellduality.data.loading import CellData

NAN = float("nan")

#: Per-perturbation metrics averaged into a table row (counts such as ``n_de`` are not averaged).
PERTURBATION_AVERAGED = (
    "pearson_delta",
    "pearson_delta_de",
    "rmse_de",
    "de_spearman",
    "pathway_pearson",
    "pathway_cosine",
    "scfid",
)


def _mean(values: Any) -> float:
    """Mean of the finite values (``nan`` when there are none): one failed item must not hide the rest."""
    arr = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else NAN


# ----------------------------------------------------------------------------------------------------
# results


@dataclass
class MethodScore:
    """One row of a task's table: a model, a baseline or a reference, and what the plots need.

    ``kind`` is one of :data:`cellduality.eval.metric_info.KINDS`: a ``reference`` (real cells scored
    like a method) informs but does not bound; ``ceiling`` is reserved for true upper bounds, and the
    report relabels any ceiling that another row beats.
    """

    name: str
    kind: str  # "model" | "baseline" | "reference" | "ceiling"
    metrics: dict[str, float]
    per_condition: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: np.ndarray | None = None
    points: np.ndarray | None = None  # 2-D PCA coordinates of the generated cells
    point_labels: list[str] | None = None
    note: str = ""
    #: one score per test row (a model's): right/wrong, kNN hit, the cell's Pearson delta on DE genes;
    #: what two models' differences are paired on, row by row
    per_row: list[float] | None = None


@dataclass
class TaskResult:
    """Everything reported for one task: the methods side by side and the shared reference."""

    task: str
    n_examples: int
    methods: list[MethodScore] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    reference_points: np.ndarray | None = None
    reference_labels: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# the real cells


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

    def reconstruct(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        """Expression of sentences via the rank fit; an empty sentence (invalid output) is a ``nan`` row."""
        out = np.full((len(sentences), len(self.genes)), NAN)
        valid = [i for i, s in enumerate(sentences) if len(s)]
        if valid:
            out[valid] = sentences_to_matrix([sentences[i] for i in valid], self.genes, self.fit)
        return out


def _recorded_source(meta: Mapping[str, Any]) -> dict[str, Any]:
    """How ``prepare`` read the data (``meta['source']``): the file's path (``None`` for an embedded
    dataset or an in-memory AnnData), ``layer`` and ``gene_symbols``; empty for a folder from before."""
    source = meta.get("source")
    return dict(source) if isinstance(source, Mapping) else {}


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
    evaluation need not be told again what ``prepare`` was told. ``data_path`` / ``layer`` /
    ``gene_symbols`` given here win over the recorded ones (the file moved, or it is read another way).
    """
    from cellduality.data.embedded import EMBEDDED, load_dataset
    from cellduality.data.loading import ZSCORE

    name = str(meta.get("dataset", ""))
    allow_scaled = meta.get("value_type") == ZSCORE
    source = _recorded_source(meta)
    layer = layer if layer is not None else source.get("layer")
    gene_symbols = gene_symbols if gene_symbols is not None else source.get("gene_symbols")
    if data_path is None and name not in EMBEDDED and source.get("path"):
        data_path = source["path"]
        if not Path(data_path).exists():
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


# ----------------------------------------------------------------------------------------------------
# parsing completions


def classification_predictions(
    rows: Sequence[Mapping[str, Any]], completions: Sequence[Any]
) -> list[str | None]:
    """The candidate each completion names (``None`` when it names none)."""
    return [parse_label(c, r.get("candidates") or []) for r, c in zip(rows, completions, strict=True)]


def generated_sentences(
    rows: Sequence[Mapping[str, Any]], completions: Sequence[Any], vocabulary: Mapping[str, str]
) -> list[list[str]]:
    """Cleaned gene lists (contract cleaning, truncated to the requested length); empty when invalid."""
    return [
        parse_genes(c, vocabulary, int(r.get("n_genes") or 0) or None)
        for r, c in zip(rows, completions, strict=True)
    ]


def _rates(valid: Sequence[bool], completions: Sequence[Any] | None) -> dict[str, float]:
    out = {"valid_output_rate": float(np.mean(valid)) if len(valid) else NAN}
    if completions is not None:
        out["format_rate"] = m.format_rate(completions)
    return out


# ----------------------------------------------------------------------------------------------------
# classification: annotation, drug sensitivity


def classification_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """All labels the examples can take (candidates and answers), sorted: the confusion matrix axes."""
    labels: set[str] = set()
    for r in rows:
        labels.update(str(c) for c in r.get("candidates") or [])
        labels.add(str(r.get("answer", "")))
    return sorted(labels - {""})


def score_classification(
    name: str,
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    predictions: Sequence[str | None],
    labels: Sequence[str],
    completions: Sequence[Any] | None = None,
) -> MethodScore:
    """Accuracy, macro-F1, valid-output and format rates, and the confusion matrix (last column: invalid)."""
    y_true = [str(r.get("answer", "")) for r in rows]
    preds = [None if p is None else str(p) for p in predictions]
    metrics = m.classification_metrics(y_true, preds, labels, completions)
    per_row = [float(p is not None and p == t) for p, t in zip(preds, y_true, strict=True)]
    return MethodScore(name, kind, metrics, confusion=m.confusion(y_true, preds, labels), per_row=per_row)


# ----------------------------------------------------------------------------------------------------
# conditional generation


def _pca2(real: np.ndarray, seed: int) -> Any:
    """A 2-D PCA of the real cells for the scatter plots (``None`` with fewer than 3 cells)."""
    from sklearn.decomposition import PCA

    finite = real[np.isfinite(real).all(axis=1)]
    if finite.shape[0] < 3 or finite.shape[1] < 2:
        return None
    return PCA(n_components=2, random_state=seed).fit(finite)


def _project(pca: Any, x: np.ndarray) -> np.ndarray | None:
    if pca is None:
        return None
    ok = np.isfinite(x).all(axis=1)
    return pca.transform(x[ok]) if ok.any() else np.zeros((0, 2))


class GenerationReference:
    """The real test cells of the generation examples: expression, labels, sentences, embedding.

    One PCA embedding (fitted on these real cells only) serves every method, so models and baselines
    are compared in the same coordinates.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], real: RealData, k: int = 3, seed: int = 0) -> None:
        self.rows = list(rows)
        self.real = real
        self.k = k
        self.conditions = [str(r["condition"]) for r in self.rows]
        self.real_x = (
            real.dense([r["cell_id"] for r in self.rows]) if self.rows else np.zeros((0, len(real.genes)))
        )
        self.real_sentences = [str(r.get("answer", "")).split() for r in self.rows]
        self.embedder = m.fit_pca_embedder(self.real_x, seed=seed) if self.rows else None
        self.pca2 = _pca2(self.real_x, seed) if self.rows else None

    @property
    def reference_points(self) -> np.ndarray | None:
        return _project(self.pca2, self.real_x)

    def score(
        self,
        name: str,
        kind: str,
        sentences: Sequence[Sequence[str]],
        completions: Sequence[Any] | None = None,
    ) -> MethodScore:
        """kNN@k accuracy, scFID (mean over cell types), nearest-cell RWJS, rates; per-type breakdown."""
        sentences = [list(s) for s in sentences]
        valid = [bool(s) for s in sentences]
        gen = self.real.reconstruct(sentences)
        metrics = _rates(valid, completions)
        if not self.rows:
            return MethodScore(name, kind, metrics)
        fids = m.scfid_by_condition(self.real_x, self.conditions, gen, self.conditions, self.embedder)
        rwjs = m.rwjs_nearest(sentences, self.conditions, self.real_sentences, self.conditions)
        hits = m.knn_hits(self.real_x, self.conditions, gen, self.conditions, self.k, self.embedder)
        metrics.update(
            knn_accuracy=NAN if hits is None else float(hits.mean()),
            scfid=_mean(list(fids.values())),
            rwjs_nearest=_mean(rwjs),
            n=float(len(self.rows)),
        )
        cond = np.asarray(self.conditions, dtype=object)
        per = {
            c: {
                "scfid": fids.get(c, NAN),
                "rwjs_nearest": _mean(rwjs[cond == c]),
                "n": float((cond == c).sum()),
            }
            for c in sorted(set(self.conditions))
        }
        ok = np.isfinite(gen).all(axis=1)
        return MethodScore(
            name,
            kind,
            metrics,
            per_condition=per,
            points=_project(self.pca2, gen),
            point_labels=[c for c, v in zip(self.conditions, ok, strict=True) if v],
            per_row=None if hits is None else hits.astype(float).tolist(),
        )


# ----------------------------------------------------------------------------------------------------
# perturbation response


def group_label(condition: str, context: str) -> str:
    """How a (perturbation, context) group is named in tables: ``KLF1 (cell type: k562)``."""
    return f"{condition} ({context})" if context else condition


class PerturbationReference:
    """Observed and control cells of each (perturbation, context) group of the test examples.

    A group's *observed* cells are the real cells of its test examples; its *control* cells are all cells
    of the dataset whose perturbation column equals the control value in the same context (cell line,
    donor), because a delta against controls of another cell line measures the cell line, not the
    perturbation. Every prediction is compared with the same control mean.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        real: RealData,
        n_de: int = 20,
        seed: int = 0,
        max_fit_controls: int = 2000,
    ) -> None:
        self.rows = list(rows)
        self.real = real
        self.n_de = n_de
        self.row_groups = [group_label(str(r["condition"]), str(r.get("context") or "")) for r in self.rows]
        self.groups = sorted(set(self.row_groups))
        ctx_of = {
            group_label(str(r["condition"]), str(r.get("context") or "")): str(r.get("context") or "")
            for r in self.rows
        }
        self.context_of = ctx_of
        self.condition_of = {
            group_label(str(r["condition"]), str(r.get("context") or "")): str(r["condition"])
            for r in self.rows
        }
        labels = np.asarray(self.row_groups, dtype=object)
        self.observed: dict[str, np.ndarray] = {}
        self.control_mean: dict[str, np.ndarray] = {}
        self.controls: dict[str, sp.csr_matrix] = {}  # per context, sparse: only means are needed
        for g in self.groups:
            ids = [r["cell_id"] for r, lab in zip(self.rows, labels, strict=True) if lab == g]
            self.observed[g] = real.dense(ids)
            ctx = ctx_of[g]
            if ctx not in self.controls:
                self.controls[ctx] = real.x[real.control_positions(ctx or None)]
            self.control_mean[g] = m.mean_profile(self.controls[ctx])
        self.observed_delta = {
            g: m.mean_profile(self.observed[g]) - self.control_mean[g] for g in self.groups
        }
        try:
            self.weights: m.PathwayWeights | None = m.align_pathway_weights(real.genes)
        except Exception:  # the shipped table could not be read: report without pathway agreement
            self.weights = None
        stacked = None
        if self.groups:  # PCA space of the real cells: observed ones and (a capped sample of) controls
            rng = np.random.default_rng(seed)
            controls = [
                c[np.sort(rng.choice(c.shape[0], max_fit_controls, replace=False))]
                if c.shape[0] > max_fit_controls
                else c
                for c in self.controls.values()
            ]
            stacked = np.vstack([*self.observed.values(), *(c.toarray() for c in controls)])
        self.embedder = m.fit_pca_embedder(stacked, seed=seed) if stacked is not None else None
        self.pca2 = _pca2(stacked, seed) if stacked is not None else None

    @property
    def reference_points(self) -> np.ndarray | None:
        if not self.groups:
            return None
        return _project(self.pca2, np.vstack([self.observed[g] for g in self.groups]))

    @property
    def reference_labels(self) -> list[str]:
        return [g for g in self.groups for _ in range(self.observed[g].shape[0])]

    def summary(self, per: dict[str, dict[str, float]], extra: dict[str, float]) -> dict[str, float]:
        """A table row: per-perturbation metrics averaged over the scorable perturbations, plus counts."""
        present = {k for p in per.values() for k in p}
        out = {k: _mean([p.get(k, NAN) for p in per.values()]) for k in PERTURBATION_AVERAGED if k in present}
        out.update(extra)
        out["n_perturbations"] = float(len(self.groups))
        out["n_scored"] = float(sum(np.isfinite(p.get("pearson_delta", NAN)) for p in per.values()))
        return out

    def _score_predictions(
        self, name: str, kind: str, predicted: Mapping[str, np.ndarray], distributions: bool
    ) -> tuple[dict[str, dict[str, float]], float]:
        """Per-group metrics of predicted cells (matrix) or mean profiles (1-D); mean retrieval score."""
        per: dict[str, dict[str, float]] = {}
        deltas = []
        for g in self.groups:
            pred = np.asarray(predicted.get(g, np.zeros((0, len(self.real.genes)))), dtype=float)
            if pred.ndim == 2:
                pred = pred[np.isfinite(pred).all(axis=1)]
            per[g] = m.perturbation_metrics(
                pred, self.control_mean[g], self.observed[g], self.real.genes, None, self.n_de, self.weights
            )
            if distributions:
                per[g]["scfid"] = m.scfid(self.observed[g], pred, self.embedder) if pred.size else NAN
            per[g]["n"] = float(self.observed[g].shape[0])
            deltas.append(m.mean_profile(pred) - self.control_mean[g])
        retrieval = NAN
        if len(self.groups) >= 2:
            scores = m.retrieval_scores(
                np.vstack(deltas), np.vstack([self.observed_delta[g] for g in self.groups])
            )
            for g, s in zip(self.groups, scores, strict=True):
                per[g]["retrieval"] = float(s)
            retrieval = _mean(scores)
        return per, retrieval

    def score_sentences(
        self,
        name: str,
        kind: str,
        sentences: Sequence[Sequence[str]],
        completions: Sequence[Any] | None = None,
    ) -> MethodScore:
        """Generated cells (one sentence per example) against their group's observed cells."""
        sentences = [list(s) for s in sentences]
        gen = self.real.reconstruct(sentences)
        labels = np.asarray(self.row_groups, dtype=object)
        predicted = {g: gen[labels == g] for g in self.groups}
        per, retrieval = self._score_predictions(name, kind, predicted, distributions=True)
        metrics = self.summary(
            per, {"retrieval": retrieval, **_rates([bool(s) for s in sentences], completions)}
        )
        metrics["n"] = float(len(self.rows))
        ok = np.isfinite(gen).all(axis=1)
        de = {g: m.de_gene_indices(self.observed_delta[g], self.n_de) for g in self.groups}
        per_row = [
            m.verifier_pearson_de(
                cell if valid else None, self.control_mean[g], self.observed_delta[g], de[g]
            )
            for cell, valid, g in zip(gen, ok, self.row_groups, strict=True)
        ]
        return MethodScore(
            name,
            kind,
            metrics,
            per_condition=per,
            points=_project(self.pca2, gen),
            point_labels=[g for g, v in zip(self.row_groups, ok, strict=True) if v],
            per_row=per_row,
        )

    def score_profiles(
        self, name: str, kind: str, profiles: Mapping[str, np.ndarray], note: str = ""
    ) -> MethodScore:
        """Mean-profile predictions (one vector per group); scFID does not apply to a single profile."""
        per, retrieval = self._score_predictions(name, kind, profiles, distributions=False)
        metrics = self.summary(per, {"retrieval": retrieval})
        metrics["n"] = float(len(self.rows))
        return MethodScore(name, kind, metrics, per_condition=per, note=note)


__all__ = [
    "GenerationReference",
    "MethodScore",
    "PerturbationReference",
    "RealData",
    "TaskResult",
    "classification_labels",
    "classification_predictions",
    "generated_sentences",
    "group_label",
    "load_real_data",
    "score_classification",
]
