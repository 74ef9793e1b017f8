"""``cellduality.metrics``, the metrics library: each formula written once, and unchanged by the move.

Every place that computed a score (the evaluation, the verifier rewards, ``oracle_eval``, the
neighbourhood task's edit gain and greedy reference edit) now calls the library. The reference copies
below are the formulas as they stood in ``cellduality/eval/metrics.py`` before they moved (commits
094a180 and b74b95c), verbatim; on real perturbation data the library must give the same bits. The
hand-computed values pin each formula on inputs small enough to check on paper, so a change to a
formula fails here even where no old copy is kept.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellduality import metrics as m
from cellduality.metrics import registry
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


def _old_rmse_de(pred_delta, obs_delta, idx) -> float:
    if idx.size == 0:
        return NAN
    err = pred_delta[idx] - obs_delta[idx]
    return float(np.sqrt(np.mean(err**2))) if np.isfinite(err).all() else NAN


def _old_average_ranks(x: np.ndarray) -> np.ndarray:
    n = x.size
    order = np.argsort(x, kind="stable")
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    xs = x[order]
    first = np.concatenate(([True], xs[1:] != xs[:-1]))
    dense = np.cumsum(first)[inverse]
    bounds = np.concatenate((np.flatnonzero(first), [n]))
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def _old_spearman(x, y) -> float:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.size < 2 or x.shape != y.shape or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return NAN
    return _old_pearson(_old_average_ranks(x.ravel()), _old_average_ranks(y.ravel()))


def _old_verifier_rmse_de(cell, control_mean, observed_delta, de_idx) -> float:
    delta = np.asarray(cell, dtype=float).ravel() - np.asarray(control_mean, dtype=float).ravel()
    obs = np.asarray(observed_delta, dtype=float).ravel()
    idx = np.asarray(de_idx, dtype=np.int64)
    if idx.size == 0 or not np.isfinite(obs[idx]).all():
        return 0.0
    return 1.0 / (1.0 + float(np.sqrt(np.mean((delta[idx] - obs[idx]) ** 2))))


def _old_row_pearson(means: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The neighbourhood task's greedy-edit scorer before it called ``pearson_rows``."""
    mc = means - means.mean(axis=1, keepdims=True)
    tc = target - target.mean()
    den = np.linalg.norm(mc, axis=1) * np.linalg.norm(tc)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (mc @ tc) / den
    return np.where(np.isfinite(r), r, 0.0)


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


def test_errors_and_orderings_on_de_genes_are_bit_identical_to_the_old_formulas(groups) -> None:
    """RMSE and Spearman on DE genes, per perturbation and per cell (the verifier rewards), and the
    neighbourhood task's row-wise Pearson, against their copies from before the move."""
    checked = 0
    for _name, pred, ctrl, observed in groups:
        ctrl_mean = m.mean_profile(ctrl)
        pred_delta, obs_delta = m.mean_profile(pred) - ctrl_mean, m.mean_profile(observed) - ctrl_mean
        for n_de in (1, 2, 20, 200):
            idx = _old_de_gene_indices(obs_delta, n_de)
            old_rmse = _old_rmse_de(pred_delta, obs_delta, idx)
            old_rho = _old_spearman(pred_delta[idx], obs_delta[idx])
            assert _same(m.rmse_de(pred, ctrl, observed, n_de=n_de), old_rmse)
            assert _same(m.de_spearman(pred, ctrl, observed, n_de=n_de), old_rho)
            both = m.perturbation_metrics(pred, ctrl, observed, n_de=n_de)
            assert _same(both["rmse_de"], old_rmse) and _same(both["de_spearman"], old_rho)
            checked += 1
        idx = _old_de_gene_indices(obs_delta, 20)
        for i in range(min(pred.shape[0], 5)):
            cell = pred[i].toarray().ravel()
            assert _same(
                m.verifier_rmse_de(cell, ctrl_mean, obs_delta, idx),
                _old_verifier_rmse_de(cell, ctrl_mean, obs_delta, idx),
            )
            old = _old_spearman(cell[idx] - ctrl_mean[idx], obs_delta[idx])
            assert _same(m.verifier_de_spearman(cell, ctrl_mean, obs_delta, idx), (old + 1.0) / 2.0)
        rows = np.vstack([pred.toarray() - ctrl_mean, np.zeros_like(obs_delta)[None]])  # a constant row: 0
        new = m.pearson_rows(rows, obs_delta[None, :])[:, 0]
        np.testing.assert_allclose(
            np.where(np.isfinite(new), new, 0.0), _old_row_pearson(rows, obs_delta), atol=1e-12
        )
    assert checked >= 80


def test_hand_computed_values() -> None:
    """Each formula on input small enough to check on paper."""
    assert m.accuracy(["a", "b", "c", "a"], ["a", None, "c", "b"]) == 0.5
    # per class F1: a (1 tp, 1 fn) 2/3, b (0 tp) 0, c 1 -> mean 5/9; None is a miss, never a class
    assert m.macro_f1(["a", "b", "c", "a"], ["a", None, "c", "b"]) == pytest.approx(5 / 9)
    assert m.valid_output_rate(["a", None, "z"], ["a", "b"]) == pytest.approx(1 / 3)
    assert m.format_rate(["<think>x</think><answer>a</answer>", "a"]) == 0.5
    assert math.isnan(m.accuracy([], [])) and math.isnan(m.share([]))
    np.testing.assert_array_equal(
        m.confusion(["a", "b", "b"], ["a", "a", None], ["a", "b"]), [[1, 0, 0], [1, 0, 1]]
    )
    assert m.rmse(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])) == pytest.approx(math.sqrt(4 / 3))
    assert m.rmse_on_de(np.array([1.0, 0.0, 2.0]), np.array([3.0, 0.1, -1.0]), n_de=2) == pytest.approx(
        math.sqrt((4 + 9) / 2)  # DE genes: |3| and |-1|, the largest observed changes
    )
    assert m.spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 30.0, 20.0, 40.0])) == pytest.approx(
        0.8
    )
    np.testing.assert_array_equal(m.average_ranks(np.array([5.0, 1.0, 5.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert m.cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert m.nanmean([1.0, NAN, 3.0]) == 2.0 and m.spearman_brown(0.5) == pytest.approx(2 / 3)
    # 1-D Gaussians N(0, 1) and N(1, 4): 1 + 1 + 4 - 2 * sqrt(4) = 2
    assert m.frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)
    # retrieval: predictions 0 and 1 closest to their own truth; prediction 2 closest to truth 0, then its
    # own (centred dot products with truths 1 and 2: -1.0 and -0.9), so it beats one of two others
    obs = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]])
    pred = np.array([[1.0, 2.0, 3.1], [3.0, 1.1, 2.0], [1.0, 2.0, 2.9]])
    np.testing.assert_allclose(m.retrieval_scores(pred, obs), [1.0, 1.0, 0.5])
    # the verifier rewards map their scores to a reward range
    ctrl, observed = np.zeros(3), np.array([1.0, 2.0, 3.0])
    assert m.verifier_pearson_de(np.array([2.0, 4.0, 6.0]), ctrl, observed, n_de=3) == pytest.approx(1.0)
    assert m.verifier_rmse_de(np.array([1.0, 2.0, 4.0]), ctrl, observed, n_de=3) == pytest.approx(
        1 / (1 + math.sqrt(1 / 3))
    )
    assert m.verifier_de_spearman(np.array([3.0, 2.0, 1.0]), ctrl, observed, n_de=3) == pytest.approx(0.0)
    assert (
        m.verifier_rmse_de(None, ctrl, observed) == 0.0
        and m.verifier_de_spearman(None, ctrl, observed) == 0.0
    )


def test_the_registry_holds_each_metric_s_function_direction_and_best_value() -> None:
    """Every metric a report shows has an entry; each ranked one with a direction names the library
    function that computes it; the best value lies on the better side."""
    from cellduality.eval.headline import HEADLINE_METRICS
    from cellduality.eval.report import TASK_METRICS

    shown = {k for keys in [*TASK_METRICS.values(), *HEADLINE_METRICS.values()] for k in keys}
    assert shown <= set(registry.METRICS), shown - set(registry.METRICS)
    derived = {"gain_vs_unedited", "valid_edit_fraction"}  # the evaluation derives them from the edits
    for key, info in registry.METRICS.items():
        if info.higher_is_better is not None and key not in derived:
            assert info.function is not None and info.function.__module__.startswith(
                "cellduality.metrics."
            ), key
        if info.count:
            assert info.higher_is_better is None and info.function is None, key
    assert registry.metric_info("pearson_delta_de").function is m.pearson_delta_de
    assert registry.metric_info("scfid").better(0.1, 0.2) and not registry.metric_info("accuracy").better(
        0.1, 0.2
    )
    assert registry.metric_info("rmse_de").header(n_de=5) == "RMSE top-5 DE ↓"
    assert [k for k, i in registry.METRICS.items() if not i.ranked] == ["valid_output_rate", "format_rate"]
