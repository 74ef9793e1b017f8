"""cell-eval, the field's reference perturbation evaluator, on the evaluation's perturbation predictions.

``cellduality eval --cell-eval`` (needs the optional extra: ``pip install -e '.[eval]'``) puts cell-eval's
headline metrics next to ours in the perturbation report. Per model, the predicted AnnData holds one
reconstructed cell per test example plus the control cells of the same contexts, *also reconstructed
from their own sentences*; the real AnnData holds the observed test cells and the measured controls.
cell-eval subtracts each AnnData's own control mean, so the predicted delta is the model's change in the
sentence representation, not the gap between a reconstruction and a measurement. As with cell-eval's
``--celltype-col``, each cell context is evaluated on its own and the per-perturbation values are
averaged over all (perturbation, context) groups.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from cellduality.metrics.statistics import nanmean

NAN = float("nan")
PERT_COL, CONTEXT_COL, CONTROL = "perturbation", "context", "control"

#: cell-eval metric -> report column title; the means over (perturbation, context) groups go in the table.
HEADLINE: tuple[tuple[str, str], ...] = (
    ("pearson_delta", "cell-eval Pearson Δ ↑"),
    ("discrimination_score_l1", "discrimination (L1) ↑"),
    ("overlap_at_N", "DE overlap@N ↑"),
    ("de_spearman_sig", "DE count Spearman ↑"),
    ("mae", "MAE ↓"),
    ("mse", "MSE ↓"),
)

DIFFERENCES = (
    "Where the definitions differ: cell-eval's Pearson Δ subtracts each AnnData's own control mean (ours "
    "subtracts the measured control mean from both) and averages over perturbations of each context; its "
    "discrimination score ranks perturbations by L1 distance of mean profiles without the target gene "
    "(our retrieval ranks by Pearson Δ with ties counted half); its DE genes come from Mann-Whitney tests "
    "at FDR 0.05 on each AnnData (ours: the top-{n_de} genes by observed |Δ|); MAE and MSE compare raw mean "
    "profiles, not deltas. Predicted cells and their controls are reconstructions from ranks, real cells "
    "are measured, so MAE/MSE include the reconstruction error of the fit."
)


#: cell-eval metrics that fail (cell-eval logs an error) below this many perturbations per context:
#: Leiden clustering of the perturbations' centroids, and a correlation of distances across perturbations.
MIN_PERTURBATIONS = {"clustering_agreement": 10, "pearson_edistance": 2}


def metrics_to_skip(n_perturbations: int) -> list[str]:
    """The cell-eval metrics that cannot be computed on ``n_perturbations`` (controls not counted)."""
    return [name for name, low in MIN_PERTURBATIONS.items() if n_perturbations < low]


def available() -> tuple[bool, str]:
    """Whether cell-eval can run here, and the reason when it cannot."""
    if importlib.util.find_spec("cell_eval") is None:
        return False, "cell-eval is not installed: pip install -e '.[eval]' (CPU only, no CUDA wheels)"
    return True, ""


def _frame(x: np.ndarray, perts: Sequence[str], contexts: Sequence[str], genes: Sequence[str]):
    import anndata as ad

    obs = pd.DataFrame(
        {PERT_COL: pd.Categorical(list(perts)), CONTEXT_COL: pd.Categorical(list(contexts))},
        index=pd.Index([f"c{i}" for i in range(len(perts))]),
    )
    return ad.AnnData(
        X=np.asarray(x, dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes)))
    )


def evaluation_pair(
    rows: Sequence[Mapping[str, Any]], sentences: Sequence[Sequence[str]], real: Any
) -> tuple:
    """(predicted, real) AnnData for cell-eval from perturbation test rows and a method's sentences.

    ``real`` is :class:`cellduality.tasks.real_data.RealData`. Invalid predictions (no gene) are all-zero cells:
    cell-eval needs every perturbation on both sides, and an empty answer is a miss, not a gap.
    """
    import anndata as ad

    from cellduality.sentences import cell_sentences

    cfg = dict(real.meta.get("config") or {})
    n = max((int(r.get("n_genes") or 0) for r in rows), default=0) or int(cfg.get("top_k", 100))
    seed = int(cfg.get("seed", 0))
    gen = np.nan_to_num(real.reconstruct([list(s) for s in sentences]), nan=0.0)
    conditions = [str(r["condition"]) for r in rows]
    contexts = [str(r.get("context") or "") for r in rows]
    observed = real.dense([r["cell_id"] for r in rows])
    ctrl_parts_pred, ctrl_parts_real, ctrl_ctx = [], [], []
    for ctx in sorted(set(contexts)):
        x = real.x[real.control_positions(ctx or None)]
        sents = cell_sentences(
            ad.AnnData(X=x, var=pd.DataFrame(index=pd.Index(real.genes))), top_k=n, seed=seed
        )
        ctrl_parts_pred.append(np.nan_to_num(real.reconstruct(sents), nan=0.0))
        ctrl_parts_real.append(x.toarray())
        ctrl_ctx += [ctx] * x.shape[0]
    pred = _frame(
        np.vstack([gen, *ctrl_parts_pred]),
        conditions + [CONTROL] * len(ctrl_ctx),
        contexts + ctrl_ctx,
        real.genes,
    )
    obs = _frame(
        np.vstack([observed, *ctrl_parts_real]),
        conditions + [CONTROL] * len(ctrl_ctx),
        contexts + ctrl_ctx,
        real.genes,
    )
    return pred, obs


def score(pred: Any, real: Any, *, num_threads: int = 1, profile: str = "full") -> dict[str, Any]:
    """cell-eval's ``MetricsEvaluator`` per context; means of the headline metrics and per-group values."""
    from cell_eval import MetricsEvaluator

    logging.getLogger("cell_eval").setLevel(logging.WARNING)
    per: dict[str, dict[str, float]] = {}
    for ctx in sorted(set(real.obs[CONTEXT_COL].astype(str))):
        r = real[real.obs[CONTEXT_COL].astype(str) == ctx].copy()
        p = pred[pred.obs[CONTEXT_COL].astype(str) == ctx].copy()
        n_perts = r.obs[PERT_COL].nunique() - 1
        with tempfile.TemporaryDirectory() as tmp:
            evaluator = MetricsEvaluator(
                adata_pred=p, adata_real=r, control_pert=CONTROL, pert_col=PERT_COL,
                num_threads=num_threads, outdir=tmp,
            )  # fmt: skip
            skip = metrics_to_skip(n_perts) or None
            results, _ = evaluator.compute(profile=profile, skip_metrics=skip, write_csv=False)
        for item in results.to_dicts():
            group = f"{item.pop('perturbation')} ({ctx})" if ctx else str(item.pop("perturbation"))
            per[group] = {k: float(v) if v is not None else NAN for k, v in item.items()}
    means = {}
    for key, _ in HEADLINE:
        means[key] = nanmean([p.get(key, NAN) for p in per.values()])
    return {"metrics": means, "per_perturbation": per}


__all__ = [
    "DIFFERENCES",
    "HEADLINE",
    "MIN_PERTURBATIONS",
    "available",
    "evaluation_pair",
    "metrics_to_skip",
    "score",
]


def add_to_result(
    result: Any,
    rows: Sequence[Mapping[str, Any]],
    methods: Mapping[str, Sequence[Sequence[str]]],
    real: Any,
    n_de: int = 20,
) -> None:
    """Score each method's sentences with cell-eval into ``result.info['cell_eval']`` (metrics.json)."""
    scored = {}
    for name, sentences in methods.items():
        pred, obs = evaluation_pair(rows, sentences, real)
        scored[name] = score(pred, obs)
    result.info["cell_eval"] = {"methods": scored, "note": DIFFERENCES.format(n_de=n_de)}


def report_section(result: Any) -> list[str]:
    """Markdown lines: cell-eval's headline metrics per method, and where its definitions differ from ours."""
    from cellduality.eval.markdown import fmt, markdown_table

    found = (result.info or {}).get("cell_eval")
    if not found:
        return []
    rows = [
        [name, *[fmt(item["metrics"].get(key)) for key, _ in HEADLINE]]
        for name, item in found["methods"].items()
    ]
    return [
        "### cell-eval (the field's reference evaluator) on the same predictions",
        "",
        markdown_table(["method", *[title for _, title in HEADLINE]], rows),
        "",
        found["note"],
        "",
    ]


__all__ += ["add_to_result", "report_section"]
