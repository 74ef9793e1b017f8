"""Benchmark metrics for the four tasks, and single-cell verifier rewards built on the same quantities.

Everything here is a pure function of arrays and label lists: no model, no I/O. The evaluation of a
model that produced nothing usable must still finish and say so, so every function accepts empty or
degenerate input and answers with a documented value instead of raising:

* a *rate* (valid output, format) over zero items is ``nan`` (nothing was measured); over items that are
  all invalid it is ``0.0``;
* a *score* that cannot be computed (no cells, a constant vector, fewer than two points) is ``nan``;
  summaries average with ``nanmean`` semantics and report how many items were scored;
* a *verifier reward* is never ``nan``: it returns the lowest value of its range (the contract gives
  malformed output the lowest reward).

Expression inputs are cells x genes matrices (numpy or scipy sparse) of log-normalised values, or 1-D
vectors that are taken to be a mean profile already. A *delta* is a mean profile minus the control mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np
import scipy.sparse as sp

from cellduality.metrics.perturbation import de_gene_indices, pearson_delta_on_de
from cellduality.metrics.statistics import pearson
from cellduality.parsing import parse_completion

if TYPE_CHECKING:
    import pandas as pd

Matrix = Any
"""A cells x genes matrix: ``numpy.ndarray`` or a ``scipy.sparse`` matrix/array (or a 1-D mean profile)."""

NAN = float("nan")


# ----------------------------------------------------------------------------------------------------
# helpers


def _dense(x: Matrix) -> np.ndarray:
    """Dense floating array; float32 stays float32 (half the memory and time in PCA and kNN)."""
    arr = x.toarray() if sp.issparse(x) else np.asarray(x)
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float64)


def mean_profile(cells: Matrix) -> np.ndarray:
    """Mean expression per gene over the rows of ``cells``; a 1-D input is returned as a float copy.

    A matrix with no rows gives an all-``nan`` vector, so downstream scores become ``nan`` instead of
    raising (an empty prediction set is a degenerate model output, not a programming error).
    """
    if sp.issparse(cells):
        if cells.shape[0] == 0:
            return np.full(cells.shape[1], NAN)
        return np.asarray(cells.mean(axis=0), dtype=float).ravel()
    arr = np.asarray(cells, dtype=float)
    if arr.ndim == 1:
        return arr.copy()
    if arr.shape[0] == 0:
        return np.full(arr.shape[1], NAN)
    return arr.mean(axis=0)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1 with ties averaged (``scipy.stats.rankdata``'s default), without its per-call cost."""
    n = x.size
    order = np.argsort(x, kind="stable")
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    xs = x[order]
    first = np.concatenate(([True], xs[1:] != xs[:-1]))
    dense = np.cumsum(first)[inverse]
    bounds = np.concatenate((np.flatnonzero(first), [n]))
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho (average ranks for ties), i.e. Pearson of the ranks; ``nan`` when degenerate.

    Same value as ``scipy.stats.spearmanr`` (tested); ranked by hand because the verifier rewards call it
    once per completion and ``rankdata``'s overhead dominated their cost.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    return pearson(_average_ranks(x.ravel()), _average_ranks(y.ravel()))


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(np.clip(float(x @ y) / den, -1.0, 1.0)) if den > 0 else NAN


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else NAN


# ----------------------------------------------------------------------------------------------------
# classification (annotation, drug sensitivity; also the dual of generation/perturbation)


def _codes(
    y_true: Sequence[Hashable], y_pred: Sequence[Hashable | None], labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for scikit-learn (much faster than string labels on 10k items).

    Label ``labels[i]`` -> ``i``; a true label outside ``labels`` -> -1; a prediction that is ``None`` or
    outside ``labels`` -> ``len(labels)``, the "invalid" code.
    """
    index = {str(lab): i for i, lab in enumerate(labels)}
    n = len(labels)
    t = np.fromiter((index.get(str(v), -1) for v in y_true), dtype=np.int64, count=len(y_true))
    p = np.fromiter(
        (n if v is None else index.get(str(v), n) for v in y_pred), dtype=np.int64, count=len(y_pred)
    )
    return t, p


def accuracy(y_true: Sequence[str], y_pred: Sequence[str | None]) -> float:
    """Fraction of predictions equal to the true label; ``None`` (no valid answer) counts as wrong.

    Invalid answers are kept in the denominator on purpose: a model must not look better by refusing to
    answer. Empty input -> ``nan``.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        return NAN
    return float(np.mean([p is not None and p == t for t, p in zip(y_true, y_pred, strict=True)]))


def macro_f1(
    y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str] | None = None
) -> float:
    """Macro-averaged F1 over the classes present in ``y_true`` (or over ``labels`` when given).

    Macro-F1 weighs rare cell types like common ones, which accuracy does not. The default averages over
    the classes the test set holds, as scikit-learn's ``f1_score(labels=...)`` is meant to be used: a
    candidate label that never occurs in the test labels would add an F1 of 0 that no model can avoid
    (on an out-of-distribution split the score could then never reach 1). Predicting an absent class is
    still a miss for the true class (it lowers that class's recall). ``None`` predictions are misses too
    and never count as a predicted class. Pass ``labels`` only to average over a fixed label set on
    purpose. Empty -> ``nan``.
    """
    from sklearn.metrics import f1_score

    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        return NAN
    use = list(labels) if labels is not None else sorted({str(t) for t in y_true})
    if not use:
        return NAN
    t, p = _codes(y_true, y_pred, use)
    return float(f1_score(t, p, labels=np.arange(len(use)), average="macro", zero_division=0))


def confusion(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str]) -> np.ndarray:
    """Confusion counts, shape ``(len(labels), len(labels) + 1)``: rows true, columns predicted.

    Rows and the first columns follow ``labels`` (so classes absent from the data still appear, as
    zeros); the extra last column counts invalid predictions (``None`` or a label outside ``labels``),
    which scikit-learn's own matrix would silently drop. Items whose true label is not in ``labels``
    are not counted.
    """
    from sklearn.metrics import confusion_matrix

    n = len(labels)
    if len(y_true) == 0 or n == 0:
        return np.zeros((n, n + 1), dtype=np.int64)
    t, p = _codes(y_true, y_pred, labels)
    return confusion_matrix(t, p, labels=np.arange(n + 1))[:n].astype(np.int64)


def valid_output_rate(
    y_pred: Sequence[str | None], candidates: Collection[str] | Sequence[Collection[str]] | None = None
) -> float:
    """Fraction of predictions that name a candidate label (``None`` = the answer named none).

    ``candidates`` is either one collection of labels shared by all rows or one collection per row (the
    prompt's candidate list); ``None`` only checks for ``None``. Empty -> ``nan``; all invalid -> 0.
    """
    if len(y_pred) == 0:
        return NAN
    if candidates is None:
        ok = [p is not None for p in y_pred]
    elif all(isinstance(c, str) for c in candidates):
        shared = set(candidates)  # type: ignore[arg-type]
        ok = [p is not None and p in shared for p in y_pred]
    else:
        per_row = list(candidates)
        if len(per_row) != len(y_pred):
            raise ValueError(f"{len(per_row)} candidate lists for {len(y_pred)} predictions")
        ok = [p is not None and p in set(c) for p, c in zip(y_pred, per_row, strict=True)]
    return float(np.mean(ok))


def format_rate(completions: Sequence[Any]) -> float:
    """Fraction of completions in the exact contract shape ``<think>…</think><answer>…</answer>``.

    Separate from the valid-output rate because a model can answer a correct label in a broken format
    (or a well-formed nonsense label); both failure modes matter when reading a training run.
    Completions are strings or chat-message lists, as TRL hands them over. Empty -> ``nan``.
    """
    if len(completions) == 0:
        return NAN
    return float(np.mean([parse_completion(c).well_formed for c in completions]))


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str | None],
    labels: Sequence[str] | None = None,
    completions: Sequence[Any] | None = None,
) -> dict[str, float]:
    """Accuracy, macro-F1, valid-output rate and (given the raw ``completions``) format rate.

    ``labels`` (every label a prompt may offer) defines what a *valid* answer is; macro-F1 is averaged
    over the classes present in ``y_true`` only (see :func:`macro_f1`), whatever ``labels`` holds.
    """
    use = list(labels) if labels is not None else sorted({str(t) for t in y_true})
    out = {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "valid_output_rate": valid_output_rate(y_pred, use),
        "n": float(len(y_true)),
    }
    if completions is not None:
        out["format_rate"] = format_rate(completions)
    return out


# ----------------------------------------------------------------------------------------------------
# embeddings, scFID and kNN accuracy (conditional generation; also scFID per perturbation)


class Embedder(Protocol):
    """Maps a cells x genes expression matrix to a cells x d embedding (any callable will do)."""

    def __call__(self, expression: Matrix) -> np.ndarray: ...


class PCAEmbedder:
    """PCA fitted on real log-normalised expression: the default embedding space for scFID and kNN.

    Fitting on the *real* cells only keeps the space independent of the model being scored, so two
    models are compared in the same coordinates. ``n_components`` is capped by the data
    (``min(n_components, n_cells - 1, n_genes)``: n cells span at most n - 1 directions); with a single
    real cell there is no direction to learn and the embedding is the expression itself. More than
    ``max_fit_cells`` real cells are subsampled (seeded) for the fit: the principal axes of an atlas are
    stable long before its last cell, and the fit is the costly step.
    """

    def __init__(self, n_components: int = 50, seed: int = 0, max_fit_cells: int | None = 20_000) -> None:
        self.n_components = n_components
        self.seed = seed
        self.max_fit_cells = max_fit_cells
        self._pca: Any = None
        self._fitted = False

    def fit(self, real: Matrix) -> PCAEmbedder:
        from sklearn.decomposition import PCA

        x = _dense(real)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(
                f"PCAEmbedder needs a non-empty cells x genes matrix of real cells, got {x.shape}"
            )
        if self.max_fit_cells is not None and x.shape[0] > self.max_fit_cells:
            keep = np.random.default_rng(self.seed).choice(x.shape[0], self.max_fit_cells, replace=False)
            x = x[np.sort(keep)]
        n = min(self.n_components, x.shape[0] - 1, x.shape[1])
        self._pca = PCA(n_components=n, random_state=self.seed).fit(x) if n >= 1 else None
        self._fitted = True
        return self

    def __call__(self, expression: Matrix) -> np.ndarray:
        if not self._fitted:
            raise RuntimeError("PCAEmbedder.fit must be called before embedding")
        x = np.atleast_2d(_dense(expression))
        if self._pca is None:
            return x
        if x.shape[0] == 0:
            return np.zeros((0, self._pca.n_components_))
        return self._pca.transform(x)


def fit_pca_embedder(
    real: Matrix, n_components: int = 50, seed: int = 0, max_fit_cells: int | None = 20_000
) -> PCAEmbedder:
    """A :class:`PCAEmbedder` fitted on ``real`` (log-normalised expression of real cells)."""
    return PCAEmbedder(n_components, seed, max_fit_cells).fit(real)


def _finite_rows(x: Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Dense matrix and a mask of rows whose values are all finite (NaN rows = invalid outputs)."""
    arr = np.atleast_2d(_dense(x))
    if arr.shape[0] == 0:
        return arr, np.zeros(0, dtype=bool)
    return arr, np.isfinite(arr).all(axis=1)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), as in FID.

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr(sqrtm(cov1 cov2))``. ``scipy.linalg.sqrtm`` can return
    a complex result with tiny imaginary parts from rounding; the real part is used, and the result is
    clipped at 0 (rounding can make a zero distance slightly negative).
    """
    import scipy.linalg

    diff = np.asarray(mu1, dtype=float) - np.asarray(mu2, dtype=float)
    covmean = scipy.linalg.sqrtm(np.asarray(cov1, dtype=float) @ np.asarray(cov2, dtype=float))
    covmean = np.real(covmean)
    if not np.isfinite(covmean).all():
        return NAN
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(covmean))
    return max(value, 0.0)


def _gaussian(z: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ridge-regularised covariance; a single cell gets a zero covariance plus the ridge."""
    d = z.shape[1]
    mu = z.mean(axis=0)
    cov = np.cov(z, rowvar=False).reshape(d, d) if z.shape[0] >= 2 else np.zeros((d, d))
    # With fewer cells than dimensions the covariance is singular and sqrtm is ill-conditioned: a small
    # ridge keeps it positive definite and changes the distance by O(eps * d) only.
    return mu, cov + eps * np.eye(d)


def scfid(
    real: Matrix,
    generated: Matrix,
    embedder: Embedder | Callable[[Matrix], np.ndarray] | None = None,
    eps: float = 1e-6,
) -> float:
    """scFID: Fréchet distance between Gaussian fits of the embeddings of generated and real cells.

    Use it per condition (the real cells of the prompted cell type / perturbation) so it measures how
    well the *distribution* of generated cells matches, which kNN accuracy and correlations of means do
    not. ``embedder`` defaults to a PCA (50 components, capped) fitted on ``real``; pass one embedder
    fitted on all real cells to compare conditions in one space. Rows with non-finite values (invalid
    outputs) are dropped; no cells on either side -> ``nan``. Lower is better; 0 = same Gaussian.
    """
    real_x, real_ok = _finite_rows(real)
    gen_x, gen_ok = _finite_rows(generated)
    if not real_ok.any() or not gen_ok.any():
        return NAN
    emb = embedder if embedder is not None else fit_pca_embedder(real_x[real_ok])
    z_real = np.atleast_2d(np.asarray(emb(real_x[real_ok]), dtype=float))
    z_gen = np.atleast_2d(np.asarray(emb(gen_x[gen_ok]), dtype=float))
    mu1, c1 = _gaussian(z_real, eps)
    mu2, c2 = _gaussian(z_gen, eps)
    return frechet_distance(mu1, c1, mu2, c2)


def scfid_by_condition(
    real: Matrix,
    real_labels: Sequence[Hashable],
    generated: Matrix,
    conditions: Sequence[Hashable],
    embedder: Embedder | Callable[[Matrix], np.ndarray] | None = None,
    eps: float = 1e-6,
) -> dict[str, float]:
    """scFID per prompted condition, all in one embedding space (default: PCA fitted on all ``real``).

    Conditions without real cells score ``nan``.
    """
    real_x, real_ok = _finite_rows(real)
    gen_x = np.atleast_2d(_dense(generated))
    real_labels_arr = np.asarray([str(v) for v in real_labels], dtype=object)
    cond_arr = np.asarray([str(v) for v in conditions], dtype=object)
    if len(cond_arr) == 0:
        return {}
    if not real_ok.any():
        return {c: NAN for c in dict.fromkeys(cond_arr)}
    emb = embedder if embedder is not None else fit_pca_embedder(real_x[real_ok])
    out: dict[str, float] = {}
    for cond in dict.fromkeys(cond_arr):
        out[cond] = scfid(real_x[real_labels_arr == cond], gen_x[cond_arr == cond], emb, eps)
    return out


def knn_accuracy(
    real: Matrix,
    real_labels: Sequence[Hashable],
    generated: Matrix,
    conditions: Sequence[Hashable],
    k: int = 3,
    embedder: Embedder | Callable[[Matrix], np.ndarray] | None = None,
) -> float:
    """kNN@k accuracy: fraction of generated cells that a kNN fitted on real cells labels as prompted.

    A ``KNeighborsClassifier`` (k neighbours, capped by the number of real cells) is fitted on the
    embeddings of real cells and their labels, then labels the generated cells; the score is the fraction
    whose label equals the prompted ``condition``. It asks "is the generated cell recognisably of the
    requested type?". Rows with non-finite values (invalid outputs) count as misses. No generated cells
    -> ``nan``.
    """
    hits = knn_hits(real, real_labels, generated, conditions, k, embedder)
    return NAN if hits is None else float(hits.mean())


def knn_hits(
    real: Matrix,
    real_labels: Sequence[Hashable],
    generated: Matrix,
    conditions: Sequence[Hashable],
    k: int = 3,
    embedder: Embedder | Callable[[Matrix], np.ndarray] | None = None,
) -> np.ndarray | None:
    """Per generated cell, whether the kNN fitted on real cells labels it as prompted (the terms of
    :func:`knn_accuracy`, for differences paired cell by cell); ``None`` where the accuracy is ``nan``."""
    from sklearn.neighbors import KNeighborsClassifier

    real_x, real_ok = _finite_rows(real)
    gen_x, gen_ok = _finite_rows(generated)
    cond = np.asarray([str(c) for c in conditions], dtype=object)
    if len(cond) == 0 or gen_x.shape[0] == 0:
        return None
    if gen_x.shape[0] != len(cond):
        raise ValueError(f"{gen_x.shape[0]} generated cells but {len(cond)} conditions")
    labels = np.asarray([str(v) for v in real_labels], dtype=object)[real_ok]
    if labels.size == 0:
        return None
    hits = np.zeros(len(cond), dtype=bool)
    if not gen_ok.any():
        return hits
    emb = embedder if embedder is not None else fit_pca_embedder(real_x[real_ok])
    knn = KNeighborsClassifier(n_neighbors=max(1, min(k, labels.size)))
    knn.fit(np.asarray(emb(real_x[real_ok])), labels)
    hits[gen_ok] = knn.predict(np.asarray(emb(gen_x[gen_ok]))) == cond[gen_ok]
    return hits


# ----------------------------------------------------------------------------------------------------
# RWJS to the nearest real cell (vectorised form of cellduality.rwjs.rwjs)


def _rank_weights(
    sentence: Sequence[str], index: Mapping[str, int], pad: int
) -> tuple[list[int], list[float]]:
    """Column indices and 1/rank weights of a sentence, as ``rwjs`` weighs it.

    A repeated gene counts once, at its first position, and ranks are positions in the de-duplicated
    list (the contract's cleaning of generated lists). Genes missing from ``index`` get column ``pad``.
    """
    cols: list[int] = []
    weights: list[float] = []
    seen: set[str] = set()
    for gene in sentence:
        if gene in seen:
            continue
        seen.add(gene)
        cols.append(index.get(gene, pad))
        weights.append(1.0 / len(seen))
    return cols, weights


def rwjs_nearest(
    generated: Sequence[Sequence[str]],
    conditions: Sequence[Hashable],
    real: Sequence[Sequence[str]],
    real_labels: Sequence[Hashable],
    max_chunk_bytes: int = 32 * 2**20,
) -> np.ndarray:
    """Per generated sentence: the largest RWJS against the real sentences of the prompted class.

    RWJS (``cellduality.rwjs.rwjs(real, generated)``) compares ranked gene lists; taking the
    nearest real cell rewards generating *a* plausible cell of the class rather than the class average.
    The value equals ``max(rwjs(r, g) for r in real cells of the class)``, computed in vectorised chunks
    (a Python double loop is far too slow for thousands of cells): with ``w = 1/rank``,
    ``sum max(wa, wb) = sum wa + sum wb - sum min(wa, wb)``, and only the generated genes can contribute
    to ``sum min``. An empty generated sentence scores 0 (contract); a class with no real cell ``nan``.
    """
    if len(generated) != len(conditions):
        raise ValueError(f"{len(generated)} generated sentences but {len(conditions)} conditions")
    out = np.full(len(generated), NAN)
    cond = np.asarray([str(c) for c in conditions], dtype=object)
    real_lab = np.asarray([str(v) for v in real_labels], dtype=object)
    for label in dict.fromkeys(cond):
        gen_rows = np.flatnonzero(cond == label)
        real_rows = np.flatnonzero(real_lab == label)
        if real_rows.size == 0:
            continue
        index: dict[str, int] = {}
        for r in real_rows:
            for gene in real[r]:
                index.setdefault(gene, len(index))
        pad = len(index)  # an all-zero column for genes no real cell of the class has
        weights_real = np.zeros((real_rows.size, pad + 1), dtype=np.float32)
        for i, r in enumerate(real_rows):
            cols, w = _rank_weights(real[r], index, pad)
            weights_real[i, cols] = w
        sum_real = weights_real.sum(axis=1, dtype=np.float64)
        parsed = [_rank_weights(generated[g], index, pad) for g in gen_rows]
        width = max((len(c) for c, _ in parsed), default=0)
        if width == 0:
            out[gen_rows] = 0.0
            continue
        gen_cols = np.full((gen_rows.size, width), pad, dtype=np.int64)
        gen_w = np.zeros((gen_rows.size, width), dtype=np.float32)
        for j, (c, w) in enumerate(parsed):
            gen_cols[j, : len(c)] = c
            gen_w[j, : len(w)] = w
        sum_gen = gen_w.sum(axis=1, dtype=np.float64)
        chunk = max(1, max_chunk_bytes // (4 * real_rows.size * width))
        for start in range(0, gen_rows.size, chunk):
            sl = slice(start, start + chunk)
            gathered = weights_real[:, gen_cols[sl]]  # real x chunk x width
            num = np.minimum(gathered, gen_w[sl][None]).sum(axis=2, dtype=np.float64)
            den = sum_real[:, None] + sum_gen[sl][None] - num
            sim = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
            out[gen_rows[sl]] = sim.max(axis=0)
    return out


def generation_metrics(
    real: Matrix,
    real_labels: Sequence[Hashable],
    generated: Matrix,
    conditions: Sequence[Hashable],
    real_sentences: Sequence[Sequence[str]] | None = None,
    generated_sentences: Sequence[Sequence[str]] | None = None,
    k: int = 3,
    embedder: Embedder | Callable[[Matrix], np.ndarray] | None = None,
) -> dict[str, float]:
    """kNN@k accuracy, mean scFID over conditions and (given sentences) mean nearest-cell RWJS."""
    real_x, real_ok = _finite_rows(real)
    emb = embedder
    if emb is None and real_ok.any():
        emb = fit_pca_embedder(real_x[real_ok])
    fids = scfid_by_condition(real_x, real_labels, generated, conditions, emb)
    out = {
        "knn_accuracy": knn_accuracy(real_x, real_labels, generated, conditions, k, emb),
        "scfid": _nanmean(list(fids.values())),
        "n": float(len(conditions)),
    }
    if real_sentences is not None and generated_sentences is not None:
        out["rwjs_nearest"] = _nanmean(
            rwjs_nearest(generated_sentences, conditions, real_sentences, real_labels)
        )
    return out


# ----------------------------------------------------------------------------------------------------
# perturbation response


def _deltas(predicted: Matrix, control: Matrix, observed: Matrix) -> tuple[np.ndarray, np.ndarray]:
    ctrl = mean_profile(control)
    return mean_profile(predicted) - ctrl, mean_profile(observed) - ctrl


def pearson_delta(
    predicted: Matrix, control: Matrix, observed: Matrix, genes: np.ndarray | Sequence[int] | None = None
) -> float:
    """Pearson r between predicted and observed deltas from the control mean, on all genes or ``genes``.

    ``mean(pred) - mean(ctrl)`` vs ``mean(obs) - mean(ctrl)``: correlating deltas, not raw means,
    removes the baseline expression that any predictor gets right for free. ``nan`` when degenerate
    (constant delta, fewer than two genes, no cells).
    """
    pred_delta, obs_delta = _deltas(predicted, control, observed)
    if genes is not None:
        idx = np.asarray(genes, dtype=np.int64)
        pred_delta, obs_delta = pred_delta[idx], obs_delta[idx]
    return pearson(pred_delta, obs_delta)


def pearson_delta_de(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
) -> float:
    """Pearson delta on the top ``n_de`` DE genes (or the supplied ``de_genes``); see :func:`de_gene_indices`."""
    pred_delta, obs_delta = _deltas(predicted, control, observed)
    return pearson_delta_on_de(pred_delta, obs_delta, n_de=n_de, gene_names=gene_names, de_genes=de_genes)


def rmse_de(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
) -> float:
    """Root-mean-square error of the mean profiles on the DE genes (equal to the RMSE of the deltas).

    Unlike a correlation it penalises the wrong *magnitude* of the response. ``nan`` with no DE gene
    or non-finite values.
    """
    pred_delta, obs_delta = _deltas(predicted, control, observed)
    idx = de_gene_indices(obs_delta, n_de, gene_names, de_genes)
    if idx.size == 0:
        return NAN
    err = pred_delta[idx] - obs_delta[idx]
    return float(np.sqrt(np.mean(err**2))) if np.isfinite(err).all() else NAN


def de_spearman(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
) -> float:
    """Spearman rho of predicted vs observed deltas on the DE genes: the right *ordering* of effects."""
    pred_delta, obs_delta = _deltas(predicted, control, observed)
    idx = de_gene_indices(obs_delta, n_de, gene_names, de_genes)
    return _spearman(pred_delta[idx], obs_delta[idx])


def _row_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between every row of ``a`` and every row of ``b``; ``nan`` for constant rows."""

    def standardise(x: np.ndarray) -> np.ndarray:
        xc = x - x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(xc, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(norm > 0, xc / norm, NAN)

    return standardise(a) @ standardise(b).T


def retrieval_scores(
    predicted_deltas: np.ndarray,
    observed_deltas: np.ndarray,
    genes: np.ndarray | Sequence[int] | None = None,
) -> np.ndarray:
    """Normalised rank of the true perturbation when retrieving it from its predicted delta.

    Row ``p`` of both arrays belongs to perturbation ``p`` (P perturbations x G genes). With
    ``r[p, q] = pearson(predicted_deltas[p], observed_deltas[q])`` (over ``genes`` if given)::

        score[p] = (#{q != p : r[p, q] < r[p, p]} + 0.5 * #{q != p : r[p, q] == r[p, p]}) / (P - 1)

    i.e. the fraction of the *other* perturbations that the prediction resembles less than its own, ties
    counted half. 1.0: the prediction is closer to its own perturbation than to any other; 0.0: closer to
    every other one. A random predictor makes ``r[p, p]`` exchangeable with the ``r[p, q]``, so its
    expected score is exactly 0.5, whatever P. This catches predictors that output the same
    "average perturbation" for everything, which correlation with the truth alone rewards. A ``nan``
    correlation (constant vector, non-finite values) counts as the lowest similarity, so a constant
    prediction ties with everything and scores 0.5. Fewer than two perturbations -> all ``nan``.
    """
    pred = np.atleast_2d(np.asarray(predicted_deltas, dtype=float))
    obs = np.atleast_2d(np.asarray(observed_deltas, dtype=float))
    if pred.shape != obs.shape:
        raise ValueError(f"predicted {pred.shape} and observed {obs.shape} deltas differ in shape")
    n = pred.shape[0]
    if n < 2:
        return np.full(n, NAN)
    if genes is not None:
        idx = np.asarray(genes, dtype=np.int64)
        pred, obs = pred[:, idx], obs[:, idx]
    pred = np.where(np.isfinite(pred), pred, NAN)
    corr = _row_correlations(pred, obs)
    corr = np.where(np.isfinite(corr), corr, -np.inf)
    own = np.diag(corr)[:, None]
    others = ~np.eye(n, dtype=bool)
    below = ((corr < own) & others).sum(axis=1)
    ties = ((corr == own) & others).sum(axis=1)
    return (below + 0.5 * ties) / (n - 1)


@dataclass(frozen=True)
class PathwayWeights:
    """Pathway weights aligned to a dataset's genes: ``matrix`` is genes x pathways, 0 for unknown genes."""

    matrix: np.ndarray
    pathways: tuple[str, ...]
    n_shared: int


def align_pathway_weights(gene_names: Sequence[str], weights: pd.DataFrame | None = None) -> PathwayWeights:
    """Align a genes x pathways weight table (default: PROGENy human top 100) to ``gene_names``.

    Matching is case-insensitive. ``n_shared`` is how many of the dataset's genes carry a weight: with
    few shared genes (a 500-HVG panel shares only tens) pathway activities rest on little evidence, so
    reports should show it next to the agreement.
    """
    if weights is None:
        from cellduality.eval.knowledge import load_progeny

        weights = load_progeny()
    table = weights.groupby(weights.index.astype(str).str.upper()).first()
    upper = [str(g).upper() for g in gene_names]
    aligned = table.reindex(upper).fillna(0.0)
    shared = int(np.isin(upper, table.index).sum())
    return PathwayWeights(aligned.to_numpy(dtype=float), tuple(str(c) for c in table.columns), shared)


def pathway_activity(delta: np.ndarray, weights: PathwayWeights) -> np.ndarray:
    """Pathway activity of a delta (or of each row of a cells x genes delta): ``delta @ weights``.

    A PROGENy-style footprint score: genes move with the pathway's weight sign and size, summed over the
    genes shared with the weight table (non-finite deltas count as 0).
    """
    d = np.asarray(delta, dtype=float)
    return np.where(np.isfinite(d), d, 0.0) @ weights.matrix


class PathwayAgreement(NamedTuple):
    """Agreement of predicted and observed pathway activity vectors, and the evidence behind it."""

    pearson: float
    cosine: float
    n_genes: int


def pathway_agreement(
    predicted: Matrix, control: Matrix, observed: Matrix, weights: PathwayWeights
) -> PathwayAgreement:
    """Pearson and cosine similarity of predicted vs observed pathway activities (over pathways).

    This asks whether a prediction moves the right *signalling programmes*, a biologically coarser but
    more robust view than gene-level correlation. Cosine treats zero activity as "no change", which it
    is; Pearson ignores an overall offset shared by all pathways. ``nan`` when no gene is shared or an activity vector is zero.
    """
    pred_delta, obs_delta = _deltas(predicted, control, observed)
    if weights.n_shared == 0 or not (np.isfinite(pred_delta).any() and np.isfinite(obs_delta).any()):
        return PathwayAgreement(NAN, NAN, weights.n_shared)
    a = pathway_activity(pred_delta, weights)
    b = pathway_activity(obs_delta, weights)
    return PathwayAgreement(pearson(a, b), _cosine(a, b), weights.n_shared)


def perturbation_metrics(
    predicted: Matrix,
    control: Matrix,
    observed: Matrix,
    gene_names: Sequence[str] | None = None,
    de_genes: Sequence[str] | None = None,
    n_de: int = 20,
    pathway_weights: PathwayWeights | None = None,
) -> dict[str, float]:
    """All per-perturbation metrics in one dict (deltas computed once).

    Keys: ``pearson_delta``, ``pearson_delta_de``, ``rmse_de``, ``de_spearman``, ``n_de``, and with
    ``pathway_weights`` also ``pathway_pearson``, ``pathway_cosine``, ``pathway_n_genes``. Retrieval and
    scFID need all perturbations / cells at once: see :func:`retrieval_scores` and :func:`scfid`.
    """
    pred_delta, obs_delta = _deltas(predicted, control, observed)
    idx = de_gene_indices(obs_delta, n_de, gene_names, de_genes)
    err = pred_delta[idx] - obs_delta[idx]
    out = {
        "pearson_delta": pearson(pred_delta, obs_delta),
        "pearson_delta_de": pearson_delta_on_de(pred_delta, obs_delta, idx),
        "rmse_de": float(np.sqrt(np.mean(err**2))) if idx.size and np.isfinite(err).all() else NAN,
        "de_spearman": _spearman(pred_delta[idx], obs_delta[idx]),
        "n_de": float(idx.size),
    }
    if pathway_weights is not None:
        agree = pathway_agreement(pred_delta, np.zeros_like(pred_delta), obs_delta, pathway_weights)
        out.update(
            pathway_pearson=agree.pearson, pathway_cosine=agree.cosine, pathway_n_genes=float(agree.n_genes)
        )
    return out


# ----------------------------------------------------------------------------------------------------
# verifier rewards: ONE generated cell against the observed mean delta of its perturbation


def _cell_delta(cell: np.ndarray | None, control_mean: np.ndarray) -> np.ndarray | None:
    if cell is None:
        return None
    x = np.asarray(cell, dtype=float).ravel()
    ctrl = np.asarray(control_mean, dtype=float).ravel()
    if x.shape != ctrl.shape or not np.isfinite(x).all():
        return None
    return x - ctrl


def _verifier_inputs(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None,
    n_de: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    delta = _cell_delta(cell, control_mean)
    if delta is None:
        return None
    obs = np.asarray(observed_delta, dtype=float).ravel()
    idx = de_gene_indices(obs, n_de) if de_idx is None else np.asarray(de_idx, dtype=np.int64)
    if idx.size == 0:
        return None
    return delta[idx], obs[idx]


def verifier_pearson_de(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
) -> float:
    """Pearson r, in [-1, 1], of one cell's delta (cell - control mean) vs the observed mean delta on DE genes.

    A verifiable reward for perturbation GRPO: the observed response is ground truth, so a single
    sampled cell can be scored without a dual task. ``de_idx`` defaults to the top ``n_de`` genes by
    ``|observed_delta|`` (pass it precomputed when scoring many cells). No cell (``None``: output did not
    parse), a wrong length, non-finite values or a constant delta -> -1.0, the lowest reward.
    """
    delta = _cell_delta(cell, control_mean)
    r = pearson_delta_on_de(delta, observed_delta, de_idx, n_de) if delta is not None else NAN
    return r if math.isfinite(r) else -1.0


def verifier_rmse_de(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
) -> float:
    """``1 / (1 + RMSE)`` of one cell's delta vs the observed mean delta on DE genes, in (0, 1].

    The negative RMSE mapped to (0, 1]: 1 for an exact match, falling smoothly with the error size.
    Degenerate input (see :func:`verifier_pearson_de`) -> 0.0.
    """
    pair = _verifier_inputs(cell, control_mean, observed_delta, de_idx, n_de)
    if pair is None or not np.isfinite(pair[1]).all():
        return 0.0
    rmse = float(np.sqrt(np.mean((pair[0] - pair[1]) ** 2)))
    return 1.0 / (1.0 + rmse)


def verifier_de_spearman(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    de_idx: np.ndarray | Sequence[int] | None = None,
    n_de: int = 20,
) -> float:
    """``(rho + 1) / 2`` for the Spearman rho of one cell's delta vs the observed delta on DE genes.

    Rewards ordering the effects right regardless of scale, in [0, 1]. Degenerate input -> 0.0.
    """
    pair = _verifier_inputs(cell, control_mean, observed_delta, de_idx, n_de)
    rho = _spearman(*pair) if pair is not None else NAN
    return (rho + 1.0) / 2.0 if math.isfinite(rho) else 0.0


def verifier_pathway(
    cell: np.ndarray | None,
    control_mean: np.ndarray,
    observed_delta: np.ndarray,
    weights: PathwayWeights,
) -> float:
    """``(cosine + 1) / 2`` of one cell's pathway activities vs the observed ones, in [0, 1].

    ``weights`` comes from :func:`align_pathway_weights` (align once, score many cells). Cosine rather
    than Pearson because 14 pathway scores are too few to centre reliably. Degenerate input (no cell,
    no shared gene, a zero activity vector) -> 0.0.
    """
    delta = _cell_delta(cell, control_mean)
    if delta is None or weights.n_shared == 0:
        return 0.0
    obs = np.asarray(observed_delta, dtype=float).ravel()
    c = _cosine(pathway_activity(delta, weights), pathway_activity(obs, weights))
    return (c + 1.0) / 2.0 if math.isfinite(c) else 0.0
