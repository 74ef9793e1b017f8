"""Single-cell verifier rewards for perturbation GRPO: one generated cell against the observed response.

Each reward parses the completion's gene sentence, turns it into expression with the dataset's rank ->
expression fit (the same reconstruction the evaluation uses), subtracts the control mean and compares
that delta with the observed mean delta of the row's perturbation (``verifier_*`` in
:mod:`cellduality.metrics.verifier`). The ground truth is computed lazily, once per (perturbation, context)
and cached, from the prepared folder named at construction:

* observed cells: the real cells of that folder's ``split`` (default ``train``: a reward must never see
  test cells) whose examples carry this perturbation and context;
* control cells: the dataset's cells whose perturbation column equals the control value, in the same
  context (cell line, donor) when there are any.

These rewards read ground truth, so they belong with the oracle rewards in the labels-using set; rows
of other tasks get ``None``. Register them by name with :func:`register_verifier_rewards`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from cellduality import metrics as m
from cellduality.rewards.base import RowReward

PREPARED_ENV = "CELLDUALITY_PREPARED"
VERIFIER_NAMES = ("verifier_pearson", "verifier_rmse", "verifier_spearman", "verifier_pathway")


@dataclass(frozen=True)
class Truth:
    """What a verifier compares one cell with: the control mean and the observed mean delta."""

    control_mean: np.ndarray
    observed_delta: np.ndarray
    de_idx: np.ndarray
    n_observed: int


class PerturbationTruth:
    """Ground truth per (perturbation, context) of a prepared folder, computed on first use and cached.

    The dataset is read once (lazily, on the first row that needs it) and shared by all verifier
    rewards built on the same folder (:func:`perturbation_truth`).
    """

    def __init__(
        self, prepared: str | Path, split: str = "train", data_path: str | Path | None = None, n_de: int = 20
    ) -> None:
        self.prepared = Path(prepared)
        self.split = split
        self.data_path = data_path
        self.n_de = n_de
        self._lock = threading.Lock()
        self._real: Any = None
        self._cells: dict[tuple[str, str], list[str]] = {}
        self._truth: dict[tuple[str, str], Truth | None] = {}
        self._weights: m.PathwayWeights | None = None
        self._recent: dict[tuple[str, ...], np.ndarray] = {}
        self.max_recent = 4096

    def _load(self) -> Any:
        if self._real is None:
            from cellduality.eval.scoring import load_real_data
            from cellduality.tasks import load_prepared

            prepared = load_prepared(self.prepared)
            if self.split not in prepared.datasets:
                raise KeyError(
                    f"{self.prepared} has no split {self.split!r}; splits: {list(prepared.datasets)}"
                )
            ds = prepared.datasets[self.split]
            cells: dict[tuple[str, str], list[str]] = {}
            for task, cond, ctx, cid in zip(
                ds["task"], ds["condition"], ds["context"], ds["cell_id"], strict=True
            ):
                if task == "perturbation":
                    cells.setdefault((str(cond), str(ctx or "")), []).append(str(cid))
            self._cells = cells
            self._real = load_real_data(prepared.meta, self.data_path)
        return self._real

    @property
    def real(self) -> Any:
        with self._lock:
            return self._load()

    @property
    def weights(self) -> m.PathwayWeights:
        if self._weights is None:
            self._weights = m.align_pathway_weights(self.real.genes)
        return self._weights

    def get(self, condition: str, context: str = "") -> Truth | None:
        """Truth for a row's perturbation, or ``None`` when the split has no observed cell of it."""
        key = (str(condition), str(context or ""))
        with self._lock:
            if key not in self._truth:
                real = self._load()
                ids = self._cells.get(key)
                if not ids:
                    self._truth[key] = None
                else:
                    control = m.mean_profile(real.x[real.control_positions(key[1] or None)])
                    delta = m.mean_profile(real.expression(ids)) - control
                    idx = m.de_gene_indices(delta, self.n_de)
                    self._truth[key] = Truth(control, delta, idx, len(ids))
            return self._truth[key]

    def cell(self, genes: list[str]) -> np.ndarray | None:
        """Expression of a generated sentence (``None`` when it lists no known gene).

        The four verifier rewards score the same completions one after the other, so recent
        reconstructions are kept (bounded) and shared instead of being rebuilt four times.
        """
        if not genes:
            return None
        key = tuple(genes)
        with self._lock:
            hit = self._recent.get(key)
        if hit is not None:
            return hit
        from cellduality.sentences import sentence_to_expression

        real = self.real
        vector = sentence_to_expression(genes, real.genes, real.fit)
        vector.setflags(write=False)  # shared between rewards: nobody may change it
        with self._lock:
            if len(self._recent) >= self.max_recent:
                self._recent.pop(next(iter(self._recent)))
            self._recent[key] = vector
        return vector


@lru_cache(maxsize=8)
def perturbation_truth(
    prepared: str, split: str = "train", data_path: str | None = None, n_de: int = 20
) -> PerturbationTruth:
    """One shared :class:`PerturbationTruth` per folder/split/data/n_de (the four rewards share it)."""
    return PerturbationTruth(prepared, split, data_path, n_de)


class VerifierReward(RowReward):
    """Base of the verifier rewards: parse, reconstruct, look up the truth, score one cell."""

    name = "verifier"

    def __init__(
        self,
        prepared: str | Path | None = None,
        vocabulary: Mapping[str, str] | None = None,
        split: str = "train",
        data_path: str | Path | None = None,
        n_de: int = 20,
    ) -> None:
        super().__init__(vocabulary)
        prepared = prepared or os.environ.get(PREPARED_ENV)
        if not prepared:
            raise ValueError(
                f"{self.name} needs the prepared folder its ground truth comes from: pass prepared=... "
                f"(or register_verifier_rewards(prepared=...), or set {PREPARED_ENV})"
            )
        self.truth = perturbation_truth(str(prepared), split, str(data_path) if data_path else None, n_de)

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        if row.get("task") != "perturbation":
            return None
        truth = self.truth.get(str(row.get("condition", "")), str(row.get("context") or ""))
        if truth is None:
            return None  # no observed cell of this perturbation: nothing to verify against
        from cellduality.parsing import gene_vocabulary, parse_genes

        vocabulary = self.vocabulary
        if vocabulary is None:
            self.vocabulary = vocabulary = gene_vocabulary(self.truth.real.genes)
        genes = parse_genes(completion, vocabulary, int(row.get("n_genes") or 0) or None)
        return float(self.verify(self.truth.cell(genes), truth))

    def verify(self, cell: np.ndarray | None, truth: Truth) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class VerifierPearson(VerifierReward):
    """Pearson r of the cell's delta vs the observed delta on the top DE genes, in [-1, 1]."""

    name = "verifier_pearson"

    def verify(self, cell: np.ndarray | None, truth: Truth) -> float:
        return m.verifier_pearson_de(cell, truth.control_mean, truth.observed_delta, truth.de_idx)


class VerifierRMSE(VerifierReward):
    """``1 / (1 + RMSE)`` on the top DE genes, in (0, 1]."""

    name = "verifier_rmse"

    def verify(self, cell: np.ndarray | None, truth: Truth) -> float:
        return m.verifier_rmse_de(cell, truth.control_mean, truth.observed_delta, truth.de_idx)


class VerifierSpearman(VerifierReward):
    """``(rho + 1) / 2`` of the DE genes' deltas, in [0, 1]: the right ordering of effects."""

    name = "verifier_spearman"

    def verify(self, cell: np.ndarray | None, truth: Truth) -> float:
        return m.verifier_de_spearman(cell, truth.control_mean, truth.observed_delta, truth.de_idx)


class VerifierPathway(VerifierReward):
    """``(cosine + 1) / 2`` of PROGENy pathway activities, in [0, 1]."""

    name = "verifier_pathway"

    def verify(self, cell: np.ndarray | None, truth: Truth) -> float:
        return m.verifier_pathway(cell, truth.control_mean, truth.observed_delta, self.truth.weights)


VERIFIERS: dict[str, type[VerifierReward]] = {
    "verifier_pearson": VerifierPearson,
    "verifier_rmse": VerifierRMSE,
    "verifier_spearman": VerifierSpearman,
    "verifier_pathway": VerifierPathway,
}


class VerifierFactory:
    """Registry factory: builds a verifier with the options bound at registration.

    ``build_rewards`` calls factories with ``vocabulary=`` only, so the prepared folder (and split,
    data path, n_de) are bound here; re-registering updates the binding instead of failing.
    """

    def __init__(self, cls: type[VerifierReward], options: Mapping[str, Any]) -> None:
        self.cls = cls
        self.options = dict(options)
        self.__name__ = cls.name

    def __call__(self, vocabulary: Mapping[str, str] | None = None, **options: Any) -> VerifierReward:
        return self.cls(vocabulary=vocabulary, **{**self.options, **options})


def register_verifier_rewards(prepared: str | Path | None = None, **options: Any) -> list[str]:
    """Register ``verifier_pearson``, ``verifier_rmse``, ``verifier_spearman``, ``verifier_pathway``.

    Idempotent: calling it again re-binds ``prepared`` and ``options`` (``split``, ``data_path``,
    ``n_de``) of the already registered factories. Without ``prepared`` the rewards read the folder from
    ``$CELLDUALITY_PREPARED`` when they are built. A different reward already registered under one of
    these names is left alone (and reported by a ``ValueError``).
    """
    from cellduality.rewards.registry import REWARDS, register_reward

    bound = {**options, **({"prepared": str(prepared)} if prepared is not None else {})}
    for name, cls in VERIFIERS.items():
        existing = REWARDS.get(name)
        if isinstance(existing, VerifierFactory):
            existing.options = dict(bound)
        elif existing is not None:
            raise ValueError(f"a different reward is already registered as {name!r}")
        else:
            register_reward(name, VerifierFactory(cls, bound))
    return list(VERIFIERS)


__all__ = [
    "PREPARED_ENV",
    "VERIFIERS",
    "VERIFIER_NAMES",
    "PerturbationTruth",
    "Truth",
    "VerifierFactory",
    "VerifierPathway",
    "VerifierPearson",
    "VerifierRMSE",
    "VerifierReward",
    "VerifierSpearman",
    "perturbation_truth",
    "register_verifier_rewards",
]
