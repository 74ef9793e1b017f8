"""Baselines every benchmark table needs next to the model: what simple methods and chance achieve.

A language model's score only means something against these: a cell-type classifier that does not beat
logistic regression on the expression itself, or a perturbation model that does not beat "predict the
control", has learnt nothing useful. Each baseline is small, deterministic (seeded) and works on numpy /
scipy-sparse matrices of log-normalised expression with label sequences.

* classification: :func:`majority_classifier`, :class:`KNNExpressionClassifier`,
  :func:`logistic_classifier` (scikit-learn estimators: ``fit(X, y)`` / ``predict(X)``);
* generation: :func:`class_mean_sentences`;
* perturbation: :class:`ControlBaseline`, :class:`MeanPerturbationBaseline`, :class:`TrainingMeanBaseline`,
  :class:`GONeighbourBaseline` (``fit(X, perturbations)`` / ``predict(perturbation)`` -> mean profile)
  and :func:`split_half_reproducibility`, how well the real cells reproduce their own response (a
  reference for the scores, not an upper bound on them).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellduality.metrics.arrays import Matrix, dense
from cellduality.metrics.knowledge import GO_BP_ROOT, load_go_bp
from cellduality.metrics.perturbation import pearson_delta
from cellduality.metrics.statistics import spearman_brown

# ----------------------------------------------------------------------------------------------------
# shared helpers


def group_means(x: Matrix, labels: Sequence[Hashable]) -> tuple[list[str], np.ndarray]:
    """Mean expression per label: (labels in first-seen order, labels x genes array).

    One sparse indicator-matrix product, so it costs one pass over the data however many groups.
    """
    lab = np.asarray([str(v) for v in labels], dtype=object)
    if lab.size != x.shape[0]:
        raise ValueError(f"{lab.size} labels for {x.shape[0]} cells")
    names = list(dict.fromkeys(lab.tolist()))
    code = {name: i for i, name in enumerate(names)}
    rows = np.fromiter((code[v] for v in lab), dtype=np.int64, count=lab.size)
    counts = np.bincount(rows, minlength=len(names)).astype(float)
    indicator = sp.csr_matrix((1.0 / counts[rows], (rows, np.arange(lab.size))), shape=(len(names), lab.size))
    means = indicator @ x
    return names, dense(means)


# ----------------------------------------------------------------------------------------------------
# classification


def majority_classifier() -> Any:
    """Always predicts the most frequent training label: the floor any classifier must beat."""
    from sklearn.dummy import DummyClassifier

    return DummyClassifier(strategy="most_frequent")


def logistic_classifier(c: float = 1.0, max_iter: int = 300, seed: int = 0) -> Any:
    """Standardised expression -> multinomial logistic regression (lbfgs): the strong linear baseline.

    Standardising puts genes on one scale so the L2 penalty treats them alike; 300 lbfgs iterations are
    enough on standardised data and keep 10k cells x 2k genes to seconds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return make_pipeline(
        FunctionTransformer(dense, accept_sparse=True),  # centring needs dense input
        StandardScaler(),
        LogisticRegression(C=c, max_iter=max_iter, random_state=seed),
    )


class KNNExpressionClassifier:
    """k-nearest-neighbour vote on expression, after PCA (capped at the data's size; ``None`` = no PCA).

    PCA removes most of the per-gene noise that makes raw-expression distances unreliable and makes the
    neighbour search fast; the classifier is the usual "label transfer from the nearest reference cells".
    """

    def __init__(self, n_neighbors: int = 5, n_components: int | None = 50, seed: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.n_components = n_components
        self.seed = seed
        self._pca: Any = None
        self._knn: Any = None

    def fit(self, x: Matrix, y: Sequence[Hashable]) -> KNNExpressionClassifier:
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier

        features = dense(x)
        labels = np.asarray(y)
        if features.shape[0] == 0:
            raise ValueError("KNNExpressionClassifier needs at least one training cell")
        self._pca = None
        n = min(self.n_components, features.shape[0] - 1, features.shape[1]) if self.n_components else 0
        if n >= 1:
            self._pca = PCA(n_components=n, random_state=self.seed).fit(features)
            features = self._pca.transform(features)
        self._knn = KNeighborsClassifier(n_neighbors=max(1, min(self.n_neighbors, features.shape[0])))
        self._knn.fit(features, labels)
        return self

    def predict(self, x: Matrix) -> np.ndarray:
        if self._knn is None:
            raise RuntimeError("KNNExpressionClassifier.fit must be called first")
        features = dense(x)
        if self._pca is not None:
            features = self._pca.transform(features)
        return self._knn.predict(features)


# ----------------------------------------------------------------------------------------------------
# conditional generation


def class_mean_sentences(
    x: Matrix, labels: Sequence[Hashable], gene_names: Sequence[str], n_genes: int = 100
) -> dict[str, list[str]]:
    """Per class, its genes ordered by mean expression over the class's cells, highest first, top ``n_genes``.

    The "average cell" of the class as a sentence: the generation baseline a model must beat to show
    it generates cells rather than recalling the class centroid. Genes with mean 0 are left out (a
    sentence lists expressed genes only); ties keep gene order, so the output is deterministic.
    """
    genes = np.asarray([str(g) for g in gene_names], dtype=object)
    if genes.size != x.shape[1]:
        raise ValueError(f"{genes.size} gene names for {x.shape[1]} genes")
    names, means = group_means(x, labels)
    out: dict[str, list[str]] = {}
    for name, row in zip(names, means, strict=True):
        order = np.argsort(-row, kind="stable")[: max(0, n_genes)]
        out[name] = genes[order[row[order] > 0]].tolist()
    return out


# ----------------------------------------------------------------------------------------------------
# perturbation response


def perturbation_targets(perturbation: str, separator: str = "+", control: str = "control") -> frozenset[str]:
    """Upper-cased target genes of a perturbation name: ``'A+B'`` -> {A, B}; control tokens dropped."""
    skip = {control.upper(), "CTRL", "CONTROL", ""}
    return frozenset(
        t.strip().upper() for t in perturbation.split(separator) if t.strip().upper() not in skip
    )


class _PerturbationBaseline:
    """Shared fit: control mean and per-perturbation mean deltas of the training perturbations."""

    def __init__(self, control: str = "control") -> None:
        self.control = control
        self.control_mean_: np.ndarray | None = None
        self.deltas_: dict[str, np.ndarray] = {}

    def fit(self, x: Matrix, perturbations: Sequence[Hashable]) -> Any:
        """Learn from training cells ``x`` (cells x genes) labelled with their perturbation."""
        names, means = group_means(x, perturbations)
        if self.control not in names:
            raise ValueError(f"no {self.control!r} cells among the perturbations (found e.g. {names[:5]})")
        self.control_mean_ = means[names.index(self.control)]
        self.deltas_ = {
            n: m - self.control_mean_ for n, m in zip(names, means, strict=True) if n != self.control
        }
        return self

    def _control(self) -> np.ndarray:
        if self.control_mean_ is None:
            raise RuntimeError(f"{type(self).__name__}.fit must be called first")
        return self.control_mean_

    def _mean_delta(self, exclude: str) -> np.ndarray:
        """Average training delta (each perturbation weighted once), leaving out ``exclude``."""
        deltas = [d for n, d in self.deltas_.items() if n != exclude]
        return np.mean(deltas, axis=0) if deltas else np.zeros_like(self._control())

    def predict(self, perturbation: str) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError


class ControlBaseline(_PerturbationBaseline):
    """Predicts the control mean: "the perturbation does nothing". Its Pearson delta is undefined (nan),
    its RMSE is the size of the true effect."""

    def predict(self, perturbation: str) -> np.ndarray:
        return self._control().copy()


class MeanPerturbationBaseline(_PerturbationBaseline):
    """Control mean + the average delta over the training perturbations (excluding the query's own name).

    Captures the response shared by all perturbations (stress of transduction, selection), which is
    often most of the Pearson delta: models should be compared against it, not against the control.
    """

    def predict(self, perturbation: str) -> np.ndarray:
        return self._control() + self._mean_delta(exclude=perturbation)


class TrainingMeanBaseline(_PerturbationBaseline):
    """Control mean + the query perturbation's own training delta (its training cells' mean response).

    The baseline to beat on an in-distribution split, where the test perturbations were trained on: a
    model that only memorised each perturbation's average response scores this. For a perturbation
    without training cells (an out-of-distribution split) it is :class:`MeanPerturbationBaseline`'s
    prediction with nothing left out.
    """

    def predict(self, perturbation: str) -> np.ndarray:
        own = self.deltas_.get(perturbation)
        return self._control() + (own if own is not None else self._mean_delta(exclude=perturbation))


def _upper_terms(go: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Upper-cased symbol -> GO terms (root dropped), symbols differing only in case merged."""
    out: dict[str, frozenset[str]] = {}
    for gene, terms in go.items():
        key = str(gene).upper()
        out[key] = out.get(key, frozenset()) | (frozenset(terms) - {GO_BP_ROOT})
    return out


@lru_cache(maxsize=1)
def _shipped_go_upper() -> Mapping[str, frozenset[str]]:
    """The shipped GO BP annotations, upper-cased once per process (one fit per cell context reuses it)."""
    return MappingProxyType(_upper_terms(load_go_bp(drop_root=True)))


class GONeighbourBaseline(_PerturbationBaseline):
    """Control mean + mean delta of the training perturbations whose targets are GO BP neighbours.

    ``go`` maps gene symbols to GO BP term sets (default: the shipped human annotations,
    :func:`cellduality.metrics.knowledge.load_go_bp`); symbols match case-insensitively. Two perturbations are neighbours when a target gene of one shares at least one GO Biological Process
    term (root ``GO:0008150`` excluded) with a target of the other, or when they share a target gene
    (a gene trivially shares its own function, and this keeps unannotated genes usable: ``A+B`` has the
    single perturbation ``A`` as neighbour). The query's own name is never its neighbour. Without
    neighbours it falls back to :class:`MeanPerturbationBaseline`. This is the simple prior-knowledge
    baseline GEARS-style models are measured against.
    """

    def __init__(
        self, go: Mapping[str, frozenset[str]] | None = None, control: str = "control", separator: str = "+"
    ) -> None:
        super().__init__(control)
        self.separator = separator
        self._go_source = go
        self._go: Mapping[str, frozenset[str]] = {}
        self._fitted_terms: list[tuple[str, frozenset[str], frozenset[str]]] | None = None

    def fit(self, x: Matrix, perturbations: Sequence[Hashable]) -> GONeighbourBaseline:
        super().fit(x, perturbations)
        go = self._go_source
        self._go = _shipped_go_upper() if go is None else _upper_terms(go)
        self._fitted_terms = None
        return self

    def _terms(self, targets: frozenset[str]) -> frozenset[str]:
        return frozenset().union(*(self._go.get(t, frozenset()) for t in targets))

    def neighbours(self, perturbation: str) -> list[str]:
        """Training perturbations that count as GO neighbours of ``perturbation`` (fit order)."""
        targets = perturbation_targets(perturbation, self.separator, self.control)
        terms = self._terms(targets)
        if self._fitted_terms is None:  # targets and terms of the training names, once per fit
            self._fitted_terms = [
                (name, other, self._terms(other))
                for name in self.deltas_
                for other in [perturbation_targets(name, self.separator, self.control)]
            ]
        return [
            name
            for name, other, other_terms in self._fitted_terms
            if name != perturbation and (not other.isdisjoint(targets) or not other_terms.isdisjoint(terms))
        ]

    def predict(self, perturbation: str) -> np.ndarray:
        found = self.neighbours(perturbation)
        if not found:
            return self._control() + self._mean_delta(exclude=perturbation)
        return self._control() + np.mean([self.deltas_[n] for n in found], axis=0)


def split_half_reproducibility(
    observed: Matrix,
    control: Matrix,
    metric: Callable[[Matrix, Matrix, Matrix], float] = pearson_delta,
    n_splits: int = 5,
    seed: int = 0,
    correct: bool = True,
) -> float:
    """Split-half reproducibility of a perturbation's measured response: how well real cells agree.

    The observed cells are split ``n_splits`` times into two random halves (seeded); each time one half
    plays the prediction and the other the observation, ``metric(half_a, control, half_b)``, and a
    positive result is corrected to the full sample size with Spearman-Brown, ``2 r / (1 + r)`` (see
    :func:`~cellduality.metrics.statistics.spearman_brown`: negative values are left as they are; turn
    ``correct`` off for metrics that are not correlations, e.g. RMSE). The mean over splits is returned
    (``nan`` splits skipped). Fewer than 2 cells -> ``nan``.

    This is a *reference*, not an upper bound on what a model can score: with a few cells per group, each
    half is noisy, while a model (or the mean-perturbation baseline) can predict a smooth average
    response that correlates better with the full observed mean than one noisy half does with the other.
    Both halves are compared with the same control, as in the evaluation, so noise in the control mean
    is shared by both deltas: with few control cells even a null perturbation gets a positive value.
    """
    n = observed.shape[0]
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(max(1, n_splits)):
        order = rng.permutation(n)
        a, b = order[: n // 2], order[n // 2 :]
        r = float(metric(observed[a], control, observed[b]))
        values.append(spearman_brown(r) if correct else r)
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


__all__ = [
    "ControlBaseline",
    "GONeighbourBaseline",
    "KNNExpressionClassifier",
    "MeanPerturbationBaseline",
    "TrainingMeanBaseline",
    "class_mean_sentences",
    "group_means",
    "logistic_classifier",
    "majority_classifier",
    "perturbation_targets",
    "split_half_reproducibility",
]
