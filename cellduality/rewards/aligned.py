"""The oracle aligned with the eval metric: the upper reference of the ablation rewards what eval scores.

A ground-truth reward is an honest upper bound for a label-free one only if it rewards the quantity
the evaluation measures; RWJS against one unpaired cell does not. ``oracle_eval`` scores

* annotation and drug sensitivity: 1 when the parsed label is the row's ``answer``, else 0 (accuracy);
* conditional generation: the share of the k = 3 nearest real RL-pool cells (kNN in a PCA space fitted
  on them, as eval's kNN@3 accuracy) whose type is the prompted one, so a cell that eval's classifier
  labels as prompted scores at least 2/3;
* perturbation: Pearson r, on the top 20 DE genes, of the generated cell's change from the control
  mean against the RL pool's mean change under that perturbation (eval's Pearson delta on DE genes,
  for one cell); an unparseable answer -1.

Genes are parsed with the row's own dataset's vocabulary, as eval parses them, and an answer naming
fewer than half of the requested genes scores lowest (-1 perturbation, 0 generation): measured on the
first run of this reward, oracle GRPO learned to answer perturbation prompts with a few genes of
another dataset, which the union vocabulary parsed and which reconstruct to a cell expressing almost
nothing, whose "change" correlates with a drug that mostly lowers expression; eval then found 15% of
its answers valid.

Its ground truth is the RL pool's labels only: the ``rl_reference`` table of the prepared folder (the
pool's cells per type and per perturbation; ``cellduality.tasks.plan.reference_rows``) and the
``answer`` column of the pool's classification rows, both from the run's prepared data in its
:class:`~cellduality.rewards.context.RewardContext`. Nothing of the test split is read. The real
expression of those cells is the context's (``RewardContext.real_data``: read once per dataset from what
``prepare`` recorded, and shared with the verifier rewards).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cellduality.parsing import match_label, parse_genes, parse_label
from cellduality.rewards.base import RowReward
from cellduality.rewards.context import RewardContext
from cellduality.tasks.dual import CLASSIFICATION_TASKS
from cellduality.tasks.real_data import RealData

#: neighbours of the generation oracle and DE genes of the perturbation oracle: eval's defaults
KNN_K = 3
N_DE = 20
#: an answer naming fewer than this share of the requested genes (of the row's dataset) scores lowest
MIN_SHARE = 0.5


class _DatasetTruth:
    """One dataset's real cells of the RL pool: a kNN over the generation reference, the mean change
    per (perturbation, context); built on first use."""

    def __init__(self, real: RealData, reference: Mapping[str, Sequence[str]]) -> None:
        self.real = real
        self.vocabulary = real.vocabulary
        self.reference = reference
        self._knn: Any = None
        self._embed: Any = None
        self._labels: np.ndarray | None = None
        self._truth: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray] | None] = {}

    def cell(self, genes: list[str]) -> np.ndarray | None:
        if not genes:
            return None
        from cellduality.sentences import sentence_to_expression

        return sentence_to_expression(genes, self.real.genes, self.real.fit)

    def type_share(self, genes: list[str], condition: str) -> float:
        """Share of the cell's k nearest RL-pool cells that are of ``condition`` (0 without a cell)."""
        cell = self.cell(genes)
        if cell is None or not np.isfinite(cell).all():
            return 0.0
        if self._knn is None:
            from sklearn.neighbors import NearestNeighbors

            from cellduality import metrics as m

            ids = [
                c
                for c, t in zip(self.reference["cell_id"], self.reference["task"], strict=True)
                if t == "generation"
            ]
            labels = [
                c
                for c, t in zip(self.reference["condition"], self.reference["task"], strict=True)
                if t == "generation"
            ]
            if not ids:
                raise ValueError("oracle_eval: the RL pool has no generation reference cell")
            x = self.real.dense(ids)
            self._embed = m.fit_pca_embedder(x)
            self._knn = NearestNeighbors(n_neighbors=min(KNN_K, len(ids))).fit(np.asarray(self._embed(x)))
            self._labels = np.asarray(labels, dtype=object)
        _, idx = self._knn.kneighbors(np.asarray(self._embed(cell[None, :])))
        return float(np.mean(self._labels[idx[0]] == condition))

    def perturbation(self, condition: str, context: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Control mean, the pool's mean change and its DE genes for one perturbation and context."""
        key = (condition, context)
        if key not in self._truth:
            ids = [
                c
                for c, t, cond, ctx in zip(
                    self.reference["cell_id"],
                    self.reference["task"],
                    self.reference["condition"],
                    self.reference["context"],
                    strict=True,
                )
                if t == "perturbation" and cond == condition and ctx == context
            ]
            if not ids:
                self._truth[key] = None
            else:
                self._truth[key] = self.real.observed_change(ids, context, N_DE)
        return self._truth[key]


class OracleEval(RowReward):
    """Ground truth scored as eval scores it (module docstring); reads the RL pool's labels only."""

    name = "oracle_eval"

    def __init__(self, context: RewardContext) -> None:
        super().__init__(context.vocabulary)
        from cellduality.tasks.plan import REFERENCE_TABLE

        prepared = context.require_prepared(self.name)
        self._context = context
        table = prepared.tables.get(REFERENCE_TABLE)
        columns = table.to_dict() if table is not None else {}
        self._reference: dict[str, dict[str, list[str]]] = {}
        for i, dataset in enumerate(columns.get("dataset", [])):
            part = self._reference.setdefault(dataset, {k: [] for k in columns})
            for k in columns:
                part[k].append(columns[k][i])
        self._truths: dict[str, _DatasetTruth] = {}
        self._lock = threading.Lock()

    def _truth(self, dataset: str) -> _DatasetTruth | None:
        with self._lock:
            if dataset not in self._truths:
                if dataset not in self._reference:
                    return None
                real = self._context.real_data(dataset)
                self._truths[dataset] = _DatasetTruth(real, self._reference[dataset])
            return self._truths[dataset]

    @classmethod
    def from_context(cls, context: RewardContext) -> OracleEval:
        """The RL pool's reference table and real cells, from the context's prepared data."""
        return cls(context).with_vocabularies(context)

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:
        task = row.get("task")
        if task in CLASSIFICATION_TASKS:
            label = parse_label(completion, row.get("candidates") or [])
            return 1.0 if label is not None and match_label(label, [row.get("answer", "")]) else 0.0
        if task not in ("generation", "perturbation"):
            return None
        truth = self._truth(str(row.get("dataset", "")))
        if truth is None:
            return None  # no RL-pool reference for this dataset (no RL pool): nothing to score against
        # the row's own dataset's genes, as eval parses them (not the run's union of datasets)
        genes = parse_genes(completion, truth.vocabulary, int(row.get("n_genes") or 0) or None)
        if len(genes) < MIN_SHARE * int(row.get("n_genes") or 0):
            # too few of the requested genes to be a cell: measured, oracle GRPO otherwise learns to name
            # a few genes (a cell that expresses nearly nothing "changes" like a down-regulating drug)
            return -1.0 if task == "perturbation" else 0.0
        if task == "generation":
            return truth.type_share(genes, str(row.get("condition", "")))
        from cellduality import metrics as m

        found = truth.perturbation(str(row.get("condition", "")), str(row.get("context") or ""))
        if found is None:
            return None
        control, delta, de_idx = found
        cell = truth.cell(genes)
        return float(m.verifier_pearson_de(cell, control, delta, de_idx))
