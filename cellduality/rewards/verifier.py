"""Single-cell verifier rewards for perturbation GRPO: one generated cell against the observed response.

Each reward parses the completion's gene sentence (with the row's dataset's genes), turns it into
expression with the dataset's rank -> expression fit (the same reconstruction the evaluation uses),
subtracts the control mean and compares that delta with the observed mean delta of the row's perturbation
(``verifier_*`` of :mod:`cellduality.metrics.verifier`). The ground truth is computed lazily, once per
(dataset, perturbation, context), from the run's prepared data in its
:class:`~cellduality.rewards.context.RewardContext`, in memory:

* observed cells: the real cells of the prepared ``split`` (default ``train``: a reward must never see
  test cells) whose examples carry this perturbation and context;
* control cells: the dataset's cells whose perturbation column equals the control value, in the same
  context (cell line, donor) when there are any.

The real expression is the context's (``RewardContext.real_data``: read once from what ``prepare``
recorded), and the four rewards share one ground truth (``RewardContext.shared``). These rewards read
ground truth, so they are in ``USES_LABELS`` with the oracle rewards; rows of other tasks get ``None``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# the verifier formulas and PROGENy's weights are still eval's; they move to cellduality.metrics
from cellduality import metrics as m
from cellduality.parsing import parse_genes
from cellduality.rewards.base import RowReward
from cellduality.rewards.context import RewardContext
from cellduality.tasks.real_data import RealData

VERIFIER_NAMES = ("verifier_pearson", "verifier_rmse", "verifier_spearman", "verifier_pathway")


@dataclass(frozen=True)
class Truth:
    """What a verifier compares one cell with: the control mean and the observed mean delta."""

    control_mean: np.ndarray
    observed_delta: np.ndarray
    de_idx: np.ndarray
    n_observed: int


class PerturbationTruth:
    """Ground truth per (dataset, perturbation, context) of the context's prepared ``split``, computed on
    first use and cached; one per context, split and ``n_de`` (:meth:`for_context`)."""

    def __init__(self, context: RewardContext, split: str = "train", n_de: int = 20) -> None:
        prepared = context.require_prepared("the verifier rewards")
        if split not in prepared.datasets:
            raise KeyError(f"the prepared data have no split {split!r}; splits: {list(prepared.datasets)}")
        ds = prepared.datasets[split]
        cells: dict[tuple[str, str, str], list[str]] = {}
        for task, dataset, cond, ctx, cid in zip(
            ds["task"], ds["dataset"], ds["condition"], ds["context"], ds["cell_id"], strict=True
        ):
            if task == "perturbation":
                cells.setdefault((str(dataset), str(cond), str(ctx or "")), []).append(str(cid))
        self.context = context
        self.split = split
        self.n_de = n_de
        self._cells = cells
        self._lock = threading.Lock()
        self._truth: dict[tuple[str, str, str], Truth | None] = {}
        self._weights: dict[str, m.PathwayWeights] = {}
        self._recent: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        self.max_recent = 4096

    @classmethod
    def for_context(cls, context: RewardContext, split: str = "train", n_de: int = 20) -> PerturbationTruth:
        """The one truth the verifier rewards of ``context`` share for this split and ``n_de``."""
        return context.shared(("verifier_truth", split, n_de), lambda: cls(context, split, n_de))

    def real(self, dataset: str) -> RealData:
        return self.context.real_data(dataset)

    def weights(self, dataset: str) -> m.PathwayWeights:
        """PROGENy's weights over ``dataset``'s genes."""
        with self._lock:
            if dataset not in self._weights:
                self._weights[dataset] = m.align_pathway_weights(self.real(dataset).genes)
            return self._weights[dataset]

    def get(self, dataset: str, condition: str, context: str = "") -> Truth | None:
        """Truth for a row's perturbation, or ``None`` when the split has no observed cell of it."""
        key = (str(dataset), str(condition), str(context or ""))
        with self._lock:
            if key not in self._truth:
                ids = self._cells.get(key)
                if not ids:
                    self._truth[key] = None
                else:
                    control, delta, idx = self.real(key[0]).observed_change(ids, key[2], self.n_de)
                    self._truth[key] = Truth(control, delta, idx, len(ids))
            return self._truth[key]

    def cell(self, dataset: str, genes: list[str]) -> np.ndarray | None:
        """Expression of a generated sentence (``None`` when it lists no known gene).

        The four verifier rewards score the same completions one after the other, so recent
        reconstructions are kept (bounded) and shared instead of being rebuilt four times.
        """
        if not genes:
            return None
        key = (dataset, tuple(genes))
        with self._lock:
            hit = self._recent.get(key)
        if hit is not None:
            return hit
        from cellduality.sentences import sentence_to_expression

        real = self.real(dataset)
        vector = sentence_to_expression(genes, real.genes, real.fit)
        vector.setflags(write=False)  # shared between rewards: nobody may change it
        with self._lock:
            if len(self._recent) >= self.max_recent:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = vector
        return vector


class VerifierReward(RowReward):
    """Base of the verifier rewards: parse, reconstruct, look up the truth, score one cell."""

    name = "verifier"

    def __init__(self, context: RewardContext, split: str = "train", n_de: int = 20) -> None:
        super().__init__(context.vocabulary)
        self.truth = PerturbationTruth.for_context(context, split, n_de)

    @classmethod
    def from_context(cls, context: RewardContext, split: str = "train", n_de: int = 20) -> VerifierReward:
        """The context's prepared data (``split``'s observed cells) and real cells."""
        return cls(context, split, n_de).with_vocabularies(context)

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        if row.get("task") != "perturbation":
            return None
        dataset = str(row.get("dataset", ""))
        truth = self.truth.get(dataset, str(row.get("condition", "")), str(row.get("context") or ""))
        if truth is None:
            return None  # no observed cell of this perturbation: nothing to verify against
        vocabulary = self.vocab_for(row)
        if vocabulary is None:
            vocabulary = self.truth.real(dataset).vocabulary
        genes = parse_genes(completion, vocabulary, int(row.get("n_genes") or 0) or None)
        return float(self.verify(self.truth.cell(dataset, genes), truth, dataset))

    def verify(
        self, cell: np.ndarray | None, truth: Truth, dataset: str
    ) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class VerifierPearson(VerifierReward):
    """Pearson r of the cell's delta vs the observed delta on the top DE genes, in [-1, 1]."""

    name = "verifier_pearson"

    def verify(self, cell: np.ndarray | None, truth: Truth, dataset: str) -> float:
        return m.verifier_pearson_de(cell, truth.control_mean, truth.observed_delta, truth.de_idx)


class VerifierRMSE(VerifierReward):
    """``1 / (1 + RMSE)`` on the top DE genes, in (0, 1]."""

    name = "verifier_rmse"

    def verify(self, cell: np.ndarray | None, truth: Truth, dataset: str) -> float:
        return m.verifier_rmse_de(cell, truth.control_mean, truth.observed_delta, truth.de_idx)


class VerifierSpearman(VerifierReward):
    """``(rho + 1) / 2`` of the DE genes' deltas, in [0, 1]: the right ordering of effects."""

    name = "verifier_spearman"

    def verify(self, cell: np.ndarray | None, truth: Truth, dataset: str) -> float:
        return m.verifier_de_spearman(cell, truth.control_mean, truth.observed_delta, truth.de_idx)


class VerifierPathway(VerifierReward):
    """``(cosine + 1) / 2`` of PROGENy pathway activities, in [0, 1]."""

    name = "verifier_pathway"

    def verify(self, cell: np.ndarray | None, truth: Truth, dataset: str) -> float:
        return m.verifier_pathway(cell, truth.control_mean, truth.observed_delta, self.truth.weights(dataset))


VERIFIERS: dict[str, type[VerifierReward]] = {
    "verifier_pearson": VerifierPearson,
    "verifier_rmse": VerifierRMSE,
    "verifier_spearman": VerifierSpearman,
    "verifier_pathway": VerifierPathway,
}


__all__ = [
    "VERIFIERS",
    "VERIFIER_NAMES",
    "PerturbationTruth",
    "Truth",
    "VerifierPathway",
    "VerifierPearson",
    "VerifierRMSE",
    "VerifierReward",
    "VerifierSpearman",
]
