"""The baseline and reference rows of a perturbation table, fitted on the training cells.

Shared by the perturbation task (:func:`cellduality.eval.runner.score_task`) and the neighbourhood task
(:func:`cellduality.eval.neighbourhood.score_neighbourhood`), whose tables carry the same rows: the
control mean, the mean perturbation, the perturbation's own training mean and (genetic perturbations)
the GO graph neighbour, each fitted per context, and the split-half reproducibility of the real cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellduality.eval.scoring import MethodScore, PerturbationReference
from cellduality.tasks.real_data import RealData

Row = dict[str, Any]


def perturbation_baselines(
    ref: PerturbationReference, train_rows: Sequence[Row], real: RealData
) -> list[MethodScore]:
    """Control, mean perturbation, the perturbation's own training mean and (genetic perturbations) GO graph
    neighbour, fitted per context."""
    from cellduality.metrics import baselines as b

    control = str(real.columns.control_value)
    kinds: list[tuple[str, type]] = [
        ("control mean", b.ControlBaseline),
        ("mean perturbation", b.MeanPerturbationBaseline),
        ("perturbation's training mean", b.TrainingMeanBaseline),
    ]
    if real.columns.perturbation_kind == "genetic":
        kinds.append(("GO graph neighbour", b.GONeighbourBaseline))
    fitted: dict[tuple[str, str], Any] = {}
    profiles: dict[str, dict[str, np.ndarray]] = {name: {} for name, _ in kinds}
    for group in ref.groups:
        ctx = ref.context_of[group]
        for name, cls in kinds:
            if (name, ctx) not in fitted:
                train = [r for r in train_rows if str(r.get("context") or "") == ctx]
                ids = [r["cell_id"] for r in train]
                labels = [str(r["condition"]) for r in train]
                ctrl = real.control_positions(ctx or None)
                x = sp.vstack([real.expression(ids), real.x[ctrl]]) if ids else real.x[ctrl]
                fitted[(name, ctx)] = cls(control=control).fit(x, labels + [control] * len(ctrl))
            model = fitted[(name, ctx)]
            # Re-anchor on the reference's control mean: the same mean computed another way differs by
            # rounding, and a Pearson correlation of that 1e-8 "delta" is noise, not the undefined value
            # "predict the control" must get.
            delta = model.predict(ref.condition_of[group]) - model.control_mean_
            profiles[name][group] = ref.control_mean[group] + delta
    return [ref.score_profiles(name, "baseline", profiles[name]) for name, _ in kinds]


def reproducibility(ref: PerturbationReference, seed: int = 0) -> MethodScore:
    """Split-half reproducibility of the observed cells: a *reference* row, not a ceiling.

    It says how well the measured response reproduces itself with this many cells; a model predicting a
    smooth average response can score above it, so the report must not call it an upper bound.
    """
    from cellduality import metrics as m
    from cellduality.metrics.baselines import split_half_reproducibility

    def de_metric(pred: Any, ctrl: Any, obs: Any) -> float:
        return m.pearson_delta_de(pred, ctrl, obs, n_de=ref.n_de)

    per: dict[str, dict[str, float]] = {}
    for g in ref.groups:
        ctrl = ref.control_mean[g]
        obs = ref.observed[g]
        per[g] = {
            "pearson_delta": split_half_reproducibility(obs, ctrl, m.pearson_delta, seed=seed),
            "pearson_delta_de": split_half_reproducibility(obs, ctrl, de_metric, seed=seed),
            "n": float(obs.shape[0]),
        }
    metrics = ref.summary(per, {"n": float(len(ref.rows))})
    note = (
        "reference, not an upper bound: two random halves of each group's real cells, one scored against "
        "the other, Spearman-Brown corrected to the full size where r > 0 (negative r left as is); "
        "— where a group has < 2 cells. With few cells per group each half is noisy, so a prediction of "
        "the average response can score higher"
    )
    return MethodScore("split-half reproducibility", "reference", metrics, per_condition=per, note=note)


__all__ = ["perturbation_baselines", "reproducibility"]
