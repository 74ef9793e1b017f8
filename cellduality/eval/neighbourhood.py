"""Evaluation of knowledge-graph neighbourhood editing on held-out perturbations.

Every prediction of this task is a *mean profile*: the control mean of the target's context plus the
mean training delta of a set of training perturbations. A model's set is its edit of the prompt's
neighbourhood (:func:`cellduality.tasks.neighbourhood.resolve_edit`: invalid items are ignored, and
an answer without an edit leaves the neighbourhood as it is); the unedited graph neighbour is the
prompt's neighbourhood itself; an empty set predicts the mean of all training perturbations. Both are
scored by :class:`cellduality.eval.scoring.PerturbationReference` against the real cells of the target
(all cells of that perturbation in that context: the split is OOD, so none of them was seen in
training), next to the perturbation task's own baselines (control mean, mean perturbation, the
uncapped GO graph neighbour) and the split-half reproducibility of the real cells (a reference row), fitted on the training perturbations' cells.
The training deltas are fitted here exactly as those baselines fit theirs, so the rows differ only in
the set of perturbations they average.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellduality.eval.perturbation_rows import perturbation_baselines, reproducibility
from cellduality.eval.scoring import (
    NAN,
    PerturbationReference,
    TaskResult,
    group_label,
)
from cellduality.metrics.statistics import nanmean
from cellduality.parsing import parse_completion
from cellduality.tasks.neighbourhood import TASK, ContextDeltas, parse_edit, resolve_edit
from cellduality.tasks.real_data import RealData

UNEDITED = "graph neighbourhood, unedited"


def edit_statistics(rows: Sequence[Mapping[str, Any]], completions: Sequence[Any]) -> dict[str, float]:
    """How the answers edit: parsed, well-formed, empty, the share of proposed items that were valid."""
    parsed = formatted = empty = 0
    proposed = valid = added = removed = 0
    for row, completion in zip(rows, completions, strict=True):
        edit = parse_edit(completion)
        if edit is None:
            continue
        parsed += 1
        formatted += bool(edit.well_formed and parse_completion(completion).well_formed)
        empty += edit.empty
        resolved = resolve_edit(edit, row.get("neighbours") or [], row.get("candidates") or [])
        proposed += resolved.n_proposed
        valid += len(resolved.added) + len(resolved.removed)
        added += len(resolved.added)
        removed += len(resolved.removed)
    n = len(rows)
    return {
        "valid_output_rate": parsed / n if n else NAN,
        "format_rate": formatted / n if n else NAN,
        "valid_edit_fraction": valid / proposed if proposed else NAN,
        "empty_edit_rate": empty / parsed if parsed else NAN,
        "mean_added": added / n if n else NAN,
        "mean_removed": removed / n if n else NAN,
    }


def _observed_rows(
    rows: Sequence[Mapping[str, Any]], real: RealData
) -> tuple[list[dict[str, Any]], list[str]]:
    """One pseudo-row per real cell of each row's (target, context), as PerturbationReference reads them."""
    conditions = real.obs[real.columns.perturbation].astype(str).to_numpy()
    contexts = real.contexts()
    names = np.asarray(real.obs.index.astype(str))
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    for row in rows:
        target, ctx = str(row["condition"]), str(row.get("context") or "")
        ids = names[(conditions == target) & (contexts == ctx)]
        if ids.size == 0:
            missing.append(group_label(target, ctx))
        out.extend({"condition": target, "context": ctx, "cell_id": str(i)} for i in ids)
    return out, missing


def _training_rows(real: RealData, holdout: set[str], contexts: set[str]) -> list[dict[str, Any]]:
    """Pseudo-rows of the training perturbations' cells in ``contexts`` (held-out values and controls out)."""
    conditions = real.obs[real.columns.perturbation].astype(str).to_numpy()
    ctx_of = real.contexts()
    names = np.asarray(real.obs.index.astype(str))
    keep = (conditions != str(real.columns.control_value)) & ~np.isin(conditions, list(holdout))
    keep &= np.isin(ctx_of, list(contexts))
    return [
        {"condition": str(c), "context": str(x), "cell_id": str(i)}
        for c, x, i in zip(conditions[keep], ctx_of[keep], names[keep], strict=True)
    ]


def _fit_deltas(
    train_rows: Sequence[Mapping[str, Any]], real: RealData, contexts: set[str]
) -> dict[str, ContextDeltas]:
    """Per context, the training perturbations' mean deltas, fitted as ``perturbation_baselines`` fits."""
    from cellduality.metrics.baselines import MeanPerturbationBaseline

    control = str(real.columns.control_value)
    out: dict[str, ContextDeltas] = {}
    for ctx in sorted(contexts):
        train = [r for r in train_rows if r["context"] == ctx]
        ids = [r["cell_id"] for r in train]
        ctrl = real.control_positions(ctx or None)
        x = sp.vstack([real.expression(ids), real.x[ctrl]]) if ids else real.x[ctrl]
        fit = MeanPerturbationBaseline(control=control).fit(
            x, [r["condition"] for r in train] + [control] * len(ctrl)
        )
        names = sorted(fit.deltas_)
        matrix = np.vstack([fit.deltas_[n] for n in names]) if names else np.zeros((0, len(real.genes)))
        out[ctx] = ContextDeltas(names, matrix)
    return out


def score_neighbourhood(
    rows: Sequence[Mapping[str, Any]],
    outputs: Mapping[str, Sequence[Any]],
    real: RealData,
    config: Any,
) -> TaskResult:
    """The neighbourhood task's table: each model's edited predictor, the unedited one, baselines, reference."""
    result = TaskResult(TASK, len(rows))
    split_info = (real.meta.get("split") or {}).get(TASK) or {}
    holdout = set(split_info.get("holdout") or [])
    notes: list[str] = [f"knowledge graph: {split_info['graph']}"] if split_info.get("graph") else []
    if not holdout:
        holdout = {str(r["condition"]) for r in rows}
        notes.append("no held-out list in the prepared meta: the evaluated targets are treated as held out")
    observed, missing = _observed_rows(rows, real)
    if missing:
        notes.append(f"targets without real cells (not scored): {', '.join(missing)}")
    ref = PerturbationReference(observed, real, n_de=config.n_de, seed=config.seed)
    contexts = {ref.context_of[g] for g in ref.groups}
    train_rows = _training_rows(real, holdout, contexts)
    deltas = _fit_deltas(train_rows, real, contexts)
    groups = [group_label(str(r["condition"]), str(r.get("context") or "")) for r in rows]

    def profiles(final_sets: Sequence[Sequence[str]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for row, group, final in zip(rows, groups, final_sets, strict=True):
            if group not in ref.control_mean:
                continue
            cd = deltas[ref.context_of[group]]
            out[group] = ref.control_mean[group] + cd.mean_of(final, exclude=str(row["condition"]))
        return out

    unedited = ref.score_profiles(
        UNEDITED,
        "baseline",
        profiles([list(r.get("neighbours") or []) for r in rows]),
        note="mean training delta of the prompt's neighbourhood (the graph neighbours perturbed in training, "
        "capped as in the prompt); the mean of all training perturbations when it is empty",
    )
    for name, completions in outputs.items():
        finals = [
            resolve_edit(parse_edit(c), r.get("neighbours") or [], r.get("candidates") or []).final
            for r, c in zip(rows, completions, strict=True)
        ]
        score = ref.score_profiles(name, "model", profiles(finals))
        score.metrics.update(edit_statistics(rows, completions))
        score.metrics["gain_vs_unedited"] = nanmean(
            [
                score.per_condition[g].get("pearson_delta", NAN)
                - unedited.per_condition[g].get("pearson_delta", NAN)
                for g in ref.groups
            ]
        )
        result.methods.append(score)
    result.methods.append(unedited)
    if config.baselines and ref.groups:
        result.methods.extend(perturbation_baselines(ref, train_rows, real))
        result.methods.append(reproducibility(ref, config.seed))
    result.info.update(
        n_de=config.n_de,
        pathway_genes=int(ref.weights.n_shared) if ref.weights is not None else 0,
        perturbations=ref.groups,
        graph=split_info.get("graph", ""),
    )
    if notes:
        result.info["note"] = "; ".join(notes)
    return result


__all__ = ["UNEDITED", "edit_statistics", "score_neighbourhood"]
