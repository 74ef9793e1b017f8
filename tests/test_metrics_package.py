"""``cellduality.metrics``: the Pearson helper and the Pearson delta on DE genes, written once.

Every place that computed them (``eval.metrics.pearson_delta_de``, ``perturbation_metrics``,
``verifier_pearson_de``, the neighbourhood task's edit gain) now calls them. The reference copies below
are the formulas as they stood in ``cellduality/eval/metrics.py`` before the move (commit 094a180),
verbatim; on real perturbation data the new code must give the same bits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellduality.eval import metrics as m
from cellduality.metrics.perturbation import de_gene_indices, pearson_delta_on_de
from cellduality.metrics.statistics import pearson
from cellduality.tasks import neighbourhood

NAN = float("nan")

# ------------------------------------------------------------------ the formulas before the move, verbatim


def _old_pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    xc = x - x.mean()
    yc = y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    if den <= 0.0:
        return NAN
    return float(np.clip(float(xc @ yc) / den, -1.0, 1.0))


def _old_de_gene_indices(observed_delta, n_de=20, gene_names=None, de_genes=None) -> np.ndarray:
    delta = np.asarray(observed_delta, dtype=float).ravel()
    if de_genes is not None:
        if gene_names is None:
            raise ValueError("de_genes needs gene_names to locate them")
        pos = {str(g).upper(): i for i, g in enumerate(gene_names)}
        idx = [pos[g.upper()] for g in de_genes if g.upper() in pos]
        return np.asarray(list(dict.fromkeys(idx)), dtype=np.int64)
    finite = np.flatnonzero(np.isfinite(delta))
    n = max(0, min(int(n_de), finite.size))
    order = np.argsort(-np.abs(delta[finite]), kind="stable")
    return finite[order[:n]]


def _old_pearson_delta_de(predicted, control, observed, gene_names=None, de_genes=None, n_de=20) -> float:
    ctrl = m.mean_profile(control)
    pred_delta, obs_delta = m.mean_profile(predicted) - ctrl, m.mean_profile(observed) - ctrl
    idx = _old_de_gene_indices(obs_delta, n_de, gene_names, de_genes)
    return _old_pearson(pred_delta[idx], obs_delta[idx])


def _old_verifier_pearson_de(cell, control_mean, observed_delta, de_idx=None, n_de=20) -> float:
    x = np.asarray(cell, dtype=float).ravel()
    ctrl = np.asarray(control_mean, dtype=float).ravel()
    if x.shape != ctrl.shape or not np.isfinite(x).all():
        return -1.0
    delta = x - ctrl
    obs = np.asarray(observed_delta, dtype=float).ravel()
    idx = _old_de_gene_indices(obs, n_de) if de_idx is None else np.asarray(de_idx, dtype=np.int64)
    if idx.size == 0:
        return -1.0
    r = _old_pearson(delta[idx], obs[idx])
    return r if math.isfinite(r) else -1.0


# ------------------------------------------------------------------ old and new on real data


def _same(a: float, b: float) -> bool:
    """Bit-identical floats (``nan`` equals ``nan``)."""
    return np.float64(a).tobytes() == np.float64(b).tobytes() or (math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def groups(norman):
    """Per perturbation of norman_devel: half its cells as a 'prediction', the other half observed, and
    the controls of its cell line."""
    cols = norman.columns
    obs = norman.adata.obs
    x = norman.adata.X
    pert = obs[cols.perturbation].astype(str).to_numpy()
    context = obs[cols.context[0]].astype(str).to_numpy()
    out = []
    for name in sorted(set(pert) - {cols.control_value})[:40]:
        rows = np.flatnonzero(pert == name)
        if rows.size < 4:
            continue
        ctx = context[rows[0]]
        ctrl = np.flatnonzero((pert == cols.control_value) & (context == ctx))
        half = rows.size // 2
        out.append((name, x[rows[:half]], x[ctrl], x[rows[half:]]))
    assert len(out) >= 20
    return out


def test_pearson_delta_on_de_is_bit_identical_to_the_old_formulas(groups, norman) -> None:
    genes = norman.genes
    checked = 0
    for name, pred, ctrl, observed in groups:
        for n_de in (1, 2, 20, 200):
            old = _old_pearson_delta_de(pred, ctrl, observed, n_de=n_de)
            assert _same(m.pearson_delta_de(pred, ctrl, observed, n_de=n_de), old), (name, n_de)
            new = m.perturbation_metrics(pred, ctrl, observed, n_de=n_de)
            assert _same(new["pearson_delta_de"], old), (name, n_de)
            checked += 1
        named = [genes[i] for i in (3, 1, 4, 1, 5, 9, 2, 6)] + ["NOT_A_GENE"]
        old = _old_pearson_delta_de(pred, ctrl, observed, gene_names=genes, de_genes=named)
        assert _same(m.pearson_delta_de(pred, ctrl, observed, gene_names=genes, de_genes=named), old)
        ctrl_mean = m.mean_profile(ctrl)
        obs_delta = m.mean_profile(observed) - ctrl_mean
        all_old = _old_pearson(m.mean_profile(pred) - ctrl_mean, obs_delta)
        assert _same(m.pearson_delta(pred, ctrl, observed), all_old)
        assert _same(m.perturbation_metrics(pred, ctrl, observed)["pearson_delta"], all_old)
        de_idx = _old_de_gene_indices(obs_delta, 20)
        np.testing.assert_array_equal(de_gene_indices(obs_delta, 20), de_idx)
        np.testing.assert_array_equal(m.de_gene_indices(obs_delta, 20), de_idx)
        for i in range(min(pred.shape[0], 5)):  # the verifier reward: one cell at a time
            cell = pred[i].toarray().ravel()
            for idx in (None, de_idx, de_idx[:1], np.zeros(0, dtype=np.int64)):
                old = _old_verifier_pearson_de(cell, ctrl_mean, obs_delta, idx)
                assert _same(m.verifier_pearson_de(cell, ctrl_mean, obs_delta, idx), old), (name, i)
            delta = cell - ctrl_mean
            assert _same(
                pearson_delta_on_de(delta, obs_delta, de_idx), _old_pearson(delta[de_idx], obs_delta[de_idx])
            )
        # the neighbourhood task's Pearson (its edit gain and greedy reference edit)
        assert _same(
            neighbourhood.pearson(obs_delta, m.mean_profile(pred) - ctrl_mean),
            _old_pearson(obs_delta, m.mean_profile(pred) - ctrl_mean),
        )
    assert checked >= 80


def test_degenerate_input_keeps_its_documented_value() -> None:
    assert math.isnan(pearson(np.ones(5), np.arange(5.0)))  # a constant vector
    assert math.isnan(pearson(np.array([1.0]), np.array([2.0])))  # fewer than two points
    assert math.isnan(pearson(np.array([1.0, NAN]), np.array([2.0, 3.0])))
    assert math.isnan(pearson_delta_on_de(np.arange(4.0), np.arange(4.0), np.zeros(0, dtype=np.int64)))
    assert m.verifier_pearson_de(None, np.zeros(3), np.ones(3)) == -1.0
    assert m.verifier_pearson_de(np.ones(2), np.zeros(3), np.ones(3)) == -1.0  # a wrong length
    assert pearson_delta_on_de(np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.3, 0.2]), n_de=3) == pytest.approx(
        0.5
    )
