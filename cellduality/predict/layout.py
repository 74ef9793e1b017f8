"""Perturbation predictions as cell-eval reads them, and the observed cells to score them against.

cell-eval (``MetricsEvaluator`` / ``cell-eval run``) compares a predicted and a real AnnData that share
their genes (same order), a perturbation column with a control value, and the same perturbations;
``--celltype-col`` splits both by cell context. :func:`cellduality.predict.perturb` writes predictions
in that layout; :func:`align_real` prepares the observed cells the same way.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import pandas as pd

from cellduality.data.loading import read_h5ad
from cellduality.data.schema import DataError


def cell_eval_command(
    predictions: ad.AnnData, pred_path: str, real_path: str, key_added: str = "cellduality"
) -> str:
    """The ``cell-eval run`` line that scores ``predictions`` (written at ``pred_path``) against ``real_path``."""
    info = dict((predictions.uns.get(key_added) or {}).get("cell_eval") or {})
    line = (
        f"cell-eval run -ap {pred_path} -ar {real_path} --pert-col {info.get('pert_col')} "
        f"--control-pert {info.get('control_pert')}"
    )
    if info.get("celltype_col"):
        line += f" --celltype-col {info['celltype_col']}"
    skip = too_few_perturbations(predictions, info)
    if skip:
        line += f" --skip-metrics {','.join(skip)}"
    return line


def too_few_perturbations(predictions: ad.AnnData, info: dict) -> list[str]:
    """The cell-eval metrics that fail on this few perturbations, skipped as ``eval --cell-eval`` skips
    them (:func:`cellduality.eval.cell_eval.metrics_to_skip`)."""
    from cellduality.eval.cell_eval import metrics_to_skip

    column = info.get("pert_col")
    if not column or column not in predictions.obs.columns:
        return []
    values = set(predictions.obs[column].astype(str)) - {str(info.get("control_pert"))}
    return metrics_to_skip(len(values))


def check_real(real: str | Path) -> None:
    """Refuse, before anything is generated, observed cells that are neither an embedded name nor a file."""
    from cellduality.data.embedded import EMBEDDED

    if str(real) in EMBEDDED:
        return
    path = Path(real)
    if not path.exists():
        raise DataError(
            f"no such file: {path} (--real takes an .h5ad file or an embedded name: {', '.join(EMBEDDED)})"
        )
    if path.is_dir():
        raise DataError(f"--real {path} is a folder; give an .h5ad file or an embedded name")


def align_real(
    real: ad.AnnData | str | Path,
    predictions: ad.AnnData,
    *,
    key_added: str = "cellduality",
    layer: str | None = None,
    gene_symbols: str | None = None,
) -> ad.AnnData:
    """The observed cells to score ``predictions`` against, in the same layout: prepared with
    ``prepare``'s rules, the same genes in the same order, only the predicted perturbations (per context)
    and the controls of those contexts. ``real`` is an AnnData, an ``.h5ad`` path or an embedded name."""
    from cellduality.data.embedded import EMBEDDED, load_dataset
    from cellduality.data.loading import prepare_anndata
    from cellduality.data.schema import Columns
    from cellduality.predict.cells import _onto_vocabulary

    info = dict((predictions.uns.get(key_added) or {}).get("cell_eval") or {})
    pert_col = info.get("pert_col")
    if not pert_col:
        raise DataError(
            f"the predictions carry no uns[{key_added!r}]['cell_eval']: make them with task perturbation"
        )
    if isinstance(real, str) and real in EMBEDDED:
        data = load_dataset(real)
    else:
        adata = real if isinstance(real, ad.AnnData) else read_h5ad(real)
        data = prepare_anndata(adata, Columns(), layer=layer, gene_symbols=gene_symbols)
    obs = data.adata.obs
    if pert_col not in obs.columns:
        raise DataError(
            f"the observed cells have no {pert_col!r} column (columns: {', '.join(map(str, obs.columns))})"
        )
    ctx = [c for c in [info.get("celltype_col")] if c]

    def keys(frame: pd.DataFrame) -> pd.Series:
        return frame[[pert_col, *ctx]].astype(str).agg("\x1f".join, axis=1)

    wanted = set(keys(predictions.obs))
    keep = keys(obs).isin(wanted).to_numpy()
    x, _ = _onto_vocabulary(
        data.adata.X[keep], data.genes, list(predictions.var_names), 0.0, "the observed cells"
    )
    out = ad.AnnData(X=x, obs=obs.loc[keep].copy(), var=pd.DataFrame(index=predictions.var_names.copy()))
    missing = wanted - set(keys(out.obs))
    if missing:
        raise DataError(
            f"the observed cells have none of {sorted(missing)[:5]} ({pert_col}{' + ' + ctx[0] if ctx else ''})"
        )
    for c in [pert_col, *ctx]:
        out.obs[c] = pd.Categorical(out.obs[c].astype(str))
    return out


__all__ = ["align_real", "cell_eval_command", "check_real"]
