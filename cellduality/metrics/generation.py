"""Conditional generation metrics: generated cells against real ones, as distributions and as sentences.

kNN@k accuracy (is a generated cell recognisably of the prompted type?), scFID (does the distribution
of generated cells match the real one?) and RWJS to the nearest real cell (is the ranked gene list that
of *a* plausible cell of the class?). Embeddings are a PCA fitted on real cells only, so every model is
scored in the same coordinates. Rows with non-finite values are invalid outputs: they count as misses
and are left out of distribution fits.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from cellduality.metrics.arrays import Matrix, dense, finite_rows
from cellduality.metrics.statistics import NAN, nanmean


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

        x = dense(real)
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
        x = np.atleast_2d(dense(expression))
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
    real_x, real_ok = finite_rows(real)
    gen_x, gen_ok = finite_rows(generated)
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
    real_x, real_ok = finite_rows(real)
    gen_x = np.atleast_2d(dense(generated))
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

    real_x, real_ok = finite_rows(real)
    gen_x, gen_ok = finite_rows(generated)
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
    real_x, real_ok = finite_rows(real)
    emb = embedder
    if emb is None and real_ok.any():
        emb = fit_pca_embedder(real_x[real_ok])
    fids = scfid_by_condition(real_x, real_labels, generated, conditions, emb)
    out = {
        "knn_accuracy": knn_accuracy(real_x, real_labels, generated, conditions, k, emb),
        "scfid": nanmean(list(fids.values())),
        "n": float(len(conditions)),
    }
    if real_sentences is not None and generated_sentences is not None:
        out["rwjs_nearest"] = nanmean(
            rwjs_nearest(generated_sentences, conditions, real_sentences, real_labels)
        )
    return out


__all__ = [
    "Embedder",
    "PCAEmbedder",
    "fit_pca_embedder",
    "frechet_distance",
    "generation_metrics",
    "knn_accuracy",
    "knn_hits",
    "rwjs_nearest",
    "scfid",
    "scfid_by_condition",
]
