"""Metrics of the benchmark evaluation: hand-computed values, agreement with scipy / scikit-learn, and
degenerate inputs (a model that produced nothing usable must still be scored, never crash)."""

from __future__ import annotations

import hashlib
import math
import os
import re
from importlib.resources import files

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score

from cellduality import metrics as m
from cellduality.metrics.knowledge import load_progeny
from cellduality.rwjs import rwjs

# ------------------------------------------------------------------------------------------ classification


def test_accuracy_counts_invalid_as_wrong() -> None:
    # a ok, None wrong, b-for-a wrong, c ok -> 2 / 4
    assert m.accuracy(["a", "b", "a", "c"], ["a", None, "b", "c"]) == 0.5


def test_macro_f1_by_hand_and_against_sklearn() -> None:
    y_true = ["a", "a", "b", "b"]
    y_pred = ["a", None, "b", "a"]
    # a: TP 1, FP 1 (b predicted as a), FN 1 (the None) -> P 1/2, R 1/2, F1 1/2
    # b: TP 1, FP 0, FN 1 (predicted a)               -> P 1, R 1/2, F1 2/3
    # macro = (1/2 + 2/3) / 2 = 7/12
    assert m.macro_f1(y_true, y_pred) == pytest.approx(7 / 12)
    rng = np.random.default_rng(0)
    labels = ["x", "y", "z", "w"]
    t = rng.choice(labels[:3], 200).tolist()
    p = [None if r < 0.2 else str(v) for r, v in zip(rng.random(200), rng.choice(labels, 200), strict=True)]
    expected = f1_score(t, [v or "none" for v in p], labels=labels, average="macro", zero_division=0)
    assert m.macro_f1(t, p, labels) == pytest.approx(expected)


def test_macro_f1_counts_only_the_classes_in_the_test_labels() -> None:
    """Candidates absent from the test labels must not cap macro-F1 (an OOD split could never reach 1)."""
    candidates = ["a", "b", "c", "d", "e"]  # the prompt offers five; the test set holds two
    y_true = ["a", "a", "b", "b"]
    perfect = m.classification_metrics(y_true, list(y_true), labels=candidates)
    assert perfect["macro_f1"] == pytest.approx(1.0) and perfect["accuracy"] == 1.0
    # over all five candidates the same perfect answers would score 2/5: the bias being fixed
    assert m.macro_f1(y_true, list(y_true), candidates) == pytest.approx(0.4)
    rng = np.random.default_rng(1)
    t = rng.choice(candidates[:3], 300).tolist()
    p = [
        None if r < 0.1 else str(v) for r, v in zip(rng.random(300), rng.choice(candidates, 300), strict=True)
    ]
    got = m.classification_metrics(t, p, labels=candidates)["macro_f1"]
    present = sorted(set(t))
    assert got == pytest.approx(
        f1_score(t, [v or "none" for v in p], labels=present, average="macro", zero_division=0)
    )
    # predicting an absent class is still a miss for the true class
    assert m.macro_f1(["a", "b"], ["a", "e"]) < 1.0


def test_confusion_keeps_absent_classes_and_counts_invalid() -> None:
    got = m.confusion(["a", "a", "b", "b"], ["a", None, "b", "zz"], labels=["a", "b", "c"])
    # columns a, b, c, invalid; class c never occurs but keeps its row and column
    expected = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(got, expected)
    assert m.confusion([], [], ["a", "b"]).shape == (2, 3)


def test_valid_output_and_format_rates() -> None:
    assert m.valid_output_rate(["a", None, "q", "b"], {"a", "b"}) == 0.5  # a, b valid of 4
    per_row = [["a"], ["b"], ["a", "q"]]
    assert m.valid_output_rate(["a", "a", "q"], per_row) == pytest.approx(
        2 / 3
    )  # row 2 names a non-candidate
    assert m.valid_output_rate(["a", None]) == 0.5
    completions = [
        "<think>r</think><answer>a</answer>",  # exact shape
        "a",  # no tags
        [{"role": "assistant", "content": "<answer>a</answer>"}],  # answer without reasoning
        [{"role": "assistant", "content": "<think>r</think> <answer>b</answer>"}],
    ]
    assert m.format_rate(completions) == 0.5


def test_classification_with_no_valid_output() -> None:
    got = m.classification_metrics(["a", "b"], [None, None], labels=["a", "b"], completions=["", "junk"])
    assert got["accuracy"] == 0.0
    assert got["macro_f1"] == 0.0
    assert got["valid_output_rate"] == 0.0
    assert got["format_rate"] == 0.0
    as_arrays = m.classification_metrics(np.array(["a", "b"]), np.array(["a", "a"]), labels=["a", "b"])
    assert as_arrays["accuracy"] == 0.5
    empty = m.classification_metrics([], [], labels=["a"], completions=[])
    assert all(math.isnan(empty[k]) for k in ("accuracy", "macro_f1", "valid_output_rate", "format_rate"))


# ------------------------------------------------------------------------------------------ generation


def test_frechet_distance_by_hand() -> None:
    # 1-D: (0 - 3)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 9 + 5 - 4 = 10
    assert m.frechet_distance(np.zeros(1), np.eye(1), np.array([3.0]), 4 * np.eye(1)) == pytest.approx(10.0)
    # 2-D diagonal: |(1, 1)|^2 + (1 + 9) + (4 + 1) - 2 (sqrt(4) + sqrt(9)) = 2 + 15 - 10 = 7
    c1, c2 = np.diag([1.0, 9.0]), np.diag([4.0, 1.0])
    assert m.frechet_distance(np.zeros(2), c1, np.ones(2), c2) == pytest.approx(7.0)


def _identity(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=float)


def test_scfid_shift_identity_and_pluggable_embedder() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 2))
    # same covariance, mean shifted by (3, 4): distance = 3^2 + 4^2 = 25 exactly
    assert m.scfid(real, real + np.array([3.0, 4.0]), embedder=_identity) == pytest.approx(25.0, abs=1e-6)
    assert m.scfid(real, real, embedder=_identity) == pytest.approx(0.0, abs=1e-6)
    # default embedder (PCA fitted on the real cells) gives the same here: PCA is a rotation
    assert m.scfid(real, real + np.array([3.0, 4.0])) == pytest.approx(25.0, abs=1e-6)
    # a far distribution scores worse than a near one
    assert m.scfid(real, real + 0.1) < m.scfid(real, real * 3)
    # float32 input stays float32 inside, with the same result; a subsampled fit barely moves it
    assert m.scfid(real.astype(np.float32), real.astype(np.float32) + 1.0) == pytest.approx(2.0, abs=1e-4)
    small = m.fit_pca_embedder(real, max_fit_cells=100)
    assert m.scfid(real, real + np.array([3.0, 4.0]), small) == pytest.approx(25.0, abs=1e-6)


def test_scfid_tiny_and_degenerate_groups() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.random((1, 30)), rng.random((1, 30))
    # one cell each: both covariances are the same ridge, so the distance is the squared mean gap
    assert m.scfid(a, b) == pytest.approx(float(np.sum((a - b) ** 2)))
    assert math.isfinite(m.scfid(rng.random((3, 30)), rng.random((2, 30))))  # fewer cells than dims
    assert math.isnan(m.scfid(a, np.zeros((0, 30))))
    assert math.isnan(m.scfid(a, np.full((4, 30), np.nan)))  # only invalid generated rows
    with_invalid = np.vstack([b, np.full((1, 30), np.nan)])
    assert m.scfid(a, with_invalid) == pytest.approx(m.scfid(a, b))  # invalid rows dropped
    fids = m.scfid_by_condition(
        np.vstack([a, b]), ["x", "y"], np.vstack([a, b, b]), ["x", "y", "q"], embedder=_identity
    )
    assert fids["x"] == pytest.approx(0.0, abs=1e-9)
    assert fids["y"] == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(fids["q"])  # no real cell of that condition


def _two_clusters(rng: np.random.Generator, n: int = 50) -> tuple[np.ndarray, list[str]]:
    a = rng.normal(0.0, 0.3, size=(n, 20))
    b = rng.normal(0.0, 0.3, size=(n, 20)) + 5.0
    return np.vstack([a, b]), ["A"] * n + ["B"] * n


def test_knn_accuracy() -> None:
    rng = np.random.default_rng(3)
    real, labels = _two_clusters(rng)
    gen = np.vstack([rng.normal(0, 0.3, (4, 20)), rng.normal(0, 0.3, (4, 20)) + 5.0])
    # 4 generated near A prompted A (hits), 4 near B: 2 prompted B (hits), 2 prompted A (misses) -> 6 / 8
    cond = ["A"] * 4 + ["B", "B", "A", "A"]
    assert m.knn_accuracy(real, labels, gen, cond, k=3) == pytest.approx(0.75)
    assert m.knn_accuracy(real, labels, gen, cond, k=3, embedder=_identity) == pytest.approx(0.75)
    # an invalid (NaN) row counts as a miss: 6 / 9
    gen_bad = np.vstack([gen, np.full((1, 20), np.nan)])
    assert m.knn_accuracy(real, labels, gen_bad, [*cond, "A"]) == pytest.approx(6 / 9)
    assert m.knn_accuracy(real, labels, np.full((2, 20), np.nan), ["A", "B"]) == 0.0
    assert math.isnan(m.knn_accuracy(real, labels, np.zeros((0, 20)), []))


def test_rwjs_nearest_matches_reference_rwjs() -> None:
    # contract example: rwjs([A, B, C], [B, A, D]) = 0.375; a second real cell equal to it gives 1.0
    got = m.rwjs_nearest([["B", "A", "D"]], ["t"], [["A", "B", "C"]], ["t"])
    assert got[0] == pytest.approx(0.375)
    got = m.rwjs_nearest([["B", "A", "D"]], ["t"], [["A", "B", "C"], ["B", "A", "D"]], ["t", "t"])
    assert got[0] == pytest.approx(1.0)
    rng = np.random.default_rng(4)
    genes = [f"G{i}" for i in range(40)]
    real = [rng.choice(genes, rng.integers(0, 15)).tolist() for _ in range(30)]  # with duplicates, empty
    labels = rng.choice(["x", "y"], 30).tolist()
    gen = [[*rng.choice(genes, rng.integers(0, 12)).tolist(), "UNSEEN"] for _ in range(25)] + [[]]
    cond = [*rng.choice(["x", "y"], 25).tolist(), "x"]
    got = m.rwjs_nearest(gen, cond, real, labels, max_chunk_bytes=2000)  # force several chunks
    expected = [
        max(rwjs(r, g) for r, lab in zip(real, labels, strict=True) if lab == c)
        for g, c in zip(gen, cond, strict=True)
    ]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[-1] == 0.0  # empty generated sentence
    assert math.isnan(m.rwjs_nearest([["G1"]], ["nobody"], real, labels)[0])


def test_generation_metrics_summary() -> None:
    rng = np.random.default_rng(5)
    real, labels = _two_clusters(rng)
    out = m.generation_metrics(
        real, labels, real[::5], labels[::5], real_sentences=[["A"]] * 100, generated_sentences=[["A"]] * 20
    )
    assert out["knn_accuracy"] == 1.0
    assert out["scfid"] >= 0.0
    assert out["rwjs_nearest"] == 1.0


# ------------------------------------------------------------------------------------------ perturbation


def test_pearson_delta_and_de_metrics_by_hand() -> None:
    ctrl = np.zeros((2, 4))
    obs = np.array([[1.0, 2, 3, 4], [1, 2, 3, 4]])
    pred = np.array([[2.0, 4, 6, 8]])
    assert m.pearson_delta(pred, ctrl, obs) == pytest.approx(1.0)
    # top-2 DE genes by |delta| are genes 3 (4) and 2 (3); pred 8, 6 -> errors 4, 3 -> sqrt(25 / 2)
    assert m.rmse_de(pred, ctrl, obs, n_de=2) == pytest.approx(math.sqrt(12.5))
    np.testing.assert_array_equal(m.de_gene_indices(np.array([0.5, -3.0, 2.0, 0.1]), 2), [1, 2])
    # a supplied DE list, matched case-insensitively, overrides the ranking; unknown names ignored
    names = ["g1", "g2", "g3", "g4"]
    np.testing.assert_array_equal(m.de_gene_indices(np.zeros(4), 2, names, ["G4", "g1", "nope"]), [3, 0])
    assert m.rmse_de(pred, ctrl, obs, names, de_genes=["g1"]) == pytest.approx(1.0)  # 2 vs 1


def test_perturbation_metrics_agree_with_scipy() -> None:
    rng = np.random.default_rng(6)
    ctrl = rng.random((30, 100))
    obs = rng.random((40, 100)) + np.linspace(0, 1, 100)
    pred = sp.csr_matrix(rng.random((25, 100)) + np.linspace(0, 1, 100) ** 2)
    pd_ = np.asarray(pred.mean(axis=0)).ravel() - ctrl.mean(0)
    od = obs.mean(0) - ctrl.mean(0)
    assert m.pearson_delta(pred, ctrl, obs) == pytest.approx(pearsonr(pd_, od)[0])
    idx = np.argsort(-np.abs(od))[:20]
    assert m.pearson_delta_de(pred, ctrl, obs) == pytest.approx(pearsonr(pd_[idx], od[idx])[0])
    assert m.de_spearman(pred, ctrl, obs) == pytest.approx(spearmanr(pd_[idx], od[idx])[0])
    summary = m.perturbation_metrics(pred, ctrl, obs)
    assert summary["pearson_delta"] == pytest.approx(m.pearson_delta(pred, ctrl, obs))
    assert summary["rmse_de"] == pytest.approx(m.rmse_de(pred, ctrl, obs))
    assert summary["n_de"] == 20


def test_spearman_with_ties_matches_scipy() -> None:
    rng = np.random.default_rng(9)
    ctrl = np.zeros((1, 30))
    for _ in range(20):
        x = rng.integers(0, 4, 30).astype(float)  # many ties: ranks must be averaged
        y = rng.integers(0, 4, 30).astype(float)
        assert m.de_spearman(x[None], ctrl, y[None], n_de=30) == pytest.approx(spearmanr(x, y)[0])
        reward = m.verifier_de_spearman(x, ctrl[0], y, de_idx=np.arange(30))
        assert reward == pytest.approx((spearmanr(x, y)[0] + 1) / 2)


def test_perturbation_metrics_degenerate() -> None:
    ctrl = np.ones((5, 10))
    obs = np.ones((5, 10)) + np.arange(10)
    empty = m.perturbation_metrics(np.zeros((0, 10)), ctrl, obs)  # model produced no cell
    assert all(math.isnan(empty[k]) for k in ("pearson_delta", "pearson_delta_de", "rmse_de", "de_spearman"))
    constant = m.perturbation_metrics(ctrl, ctrl, obs)  # predicts the control: delta 0
    assert math.isnan(constant["pearson_delta"])
    assert constant["rmse_de"] > 0


def test_retrieval_by_hand_and_random_expectation() -> None:
    obs = np.array([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(m.retrieval_scores(obs, obs), [1.0, 1.0, 1.0])
    # row 0 predicts perturbation 1's delta: r(0,0) = -1/3 ties with r(0,2), below r(0,1) -> (0 + 0.5) / 2
    pred = obs[[1, 1, 2]]
    np.testing.assert_allclose(m.retrieval_scores(pred, obs), [0.25, 1.0, 1.0])
    np.testing.assert_allclose(m.retrieval_scores(-obs, obs), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(m.retrieval_scores(np.ones((3, 4)), obs), [0.5, 0.5, 0.5])  # constant: chance
    assert np.isnan(m.retrieval_scores(obs[:1], obs[:1])).all()
    rng = np.random.default_rng(7)
    scores = [m.retrieval_scores(rng.normal(size=(20, 50)), rng.normal(size=(20, 50))) for _ in range(200)]
    assert np.mean(scores) == pytest.approx(0.5, abs=0.02)


def test_pathway_activity_and_agreement_by_hand() -> None:
    weights = pd.DataFrame({"P1": [1.0, 0.0, -1.0], "P2": [0.0, 2.0, 0.0]}, index=["G1", "G2", "G3"])
    aligned = m.align_pathway_weights(["g1", "g2", "X"], weights)
    assert aligned.n_shared == 2 and aligned.pathways == ("P1", "P2")
    # delta (1, 1, 5): P1 = 1 * 1 + 0 * 1 (G3 not in the data) = 1; P2 = 2 * 1 = 2
    np.testing.assert_allclose(m.pathway_activity(np.array([1.0, 1.0, 5.0]), aligned), [1.0, 2.0])
    ctrl = np.zeros((1, 3))
    obs = np.array([[1.0, 1.0, 5.0]])
    agree = m.pathway_agreement(obs, ctrl, obs, aligned)
    assert agree == (pytest.approx(1.0), pytest.approx(1.0), 2)
    # prediction (2, -1, 0): activities (2, -2) vs (1, 2) -> cosine (2 - 4) / (sqrt(8) sqrt(5))
    agree = m.pathway_agreement(np.array([[2.0, -1.0, 0.0]]), ctrl, obs, aligned)
    assert agree.cosine == pytest.approx(-2 / math.sqrt(40))
    assert agree.pearson == pytest.approx(-1.0)  # two points always correlate +-1
    none_shared = m.align_pathway_weights(["X", "Y", "Z"], weights)
    assert math.isnan(m.pathway_agreement(obs, ctrl, obs, none_shared).cosine)


def test_progeny_weights_package_data() -> None:
    w = load_progeny()
    assert w.shape == (1301, 14)
    assert w.loc["CDKN1A", "p53"] == pytest.approx(15.957, abs=1e-3)
    assert ((w != 0).sum() == 100).all()
    assert ((load_progeny(top=10) != 0).sum() == 10).all()
    w.loc["CDKN1A", "p53"] = 0.0  # a caller's edit must not leak into the cache
    assert load_progeny().loc["CDKN1A", "p53"] != 0.0
    aligned = m.align_pathway_weights(["cdkn1a", "MDM2", "NOT_A_GENE"])
    assert aligned.n_shared == 2


def test_knowledge_sources_checksums() -> None:
    folder = files("cellduality").joinpath("knowledge")
    sources = folder.joinpath("SOURCES.md").read_text(encoding="utf-8")
    files_table = sources.split("## Provenance")[0]
    listed = re.findall(r"^\| `([^`]+)` \|.*?\| `([0-9a-f]{64})` \|", files_table, flags=re.MULTILINE)
    assert {name for name, _ in listed} == {
        "progeny_human_top100.csv",
        "go_bp_human.tsv.gz",
        "go_terms_bp.tsv.gz",
    }
    for name, digest in listed:
        assert hashlib.sha256(folder.joinpath(name).read_bytes()).hexdigest() == digest, name
    for licence in ("Apache-2.0.txt", "r-bioc-org.hs.eg.db.copyright", "r-bioc-go.db.copyright"):
        assert folder.joinpath("licenses", licence).is_file()


# ------------------------------------------------------------------------------------------ verifiers


def test_verifier_rewards() -> None:
    rng = np.random.default_rng(8)
    ctrl = rng.random(50)
    obs_delta = rng.normal(size=50)
    perfect = ctrl + obs_delta
    weights = m.align_pathway_weights(
        [f"G{i}" for i in range(50)],
        pd.DataFrame(rng.normal(size=(50, 14)), index=[f"G{i}" for i in range(50)]),
    )
    assert m.verifier_pearson_de(perfect, ctrl, obs_delta) == pytest.approx(1.0)
    assert m.verifier_rmse_de(perfect, ctrl, obs_delta) == pytest.approx(1.0)
    assert m.verifier_de_spearman(perfect, ctrl, obs_delta) == pytest.approx(1.0)
    assert m.verifier_pathway(perfect, ctrl, obs_delta, weights) == pytest.approx(1.0)
    # off by +1 on every gene: Pearson still 1; RMSE 1 -> 1 / (1 + 1) = 0.5
    assert m.verifier_rmse_de(perfect + 1.0, ctrl, obs_delta) == pytest.approx(0.5)
    assert m.verifier_pearson_de(perfect + 1.0, ctrl, obs_delta) == pytest.approx(1.0)
    # the opposite response: Pearson -1, Spearman (-1 + 1) / 2 = 0, pathway cosine -1 -> 0
    anti = ctrl - obs_delta
    assert m.verifier_pearson_de(anti, ctrl, obs_delta) == pytest.approx(-1.0)
    assert m.verifier_de_spearman(anti, ctrl, obs_delta) == pytest.approx(0.0)
    assert m.verifier_pathway(anti, ctrl, obs_delta, weights) == pytest.approx(0.0)
    # DE genes: only the supplied ones are scored (3 genes where the cell is exact, the rest noise)
    noisy = perfect + rng.normal(scale=5.0, size=50)
    noisy[:3] = perfect[:3]
    assert m.verifier_rmse_de(noisy, ctrl, obs_delta, de_idx=[0, 1, 2]) == pytest.approx(1.0)
    assert m.verifier_rmse_de(noisy, ctrl, obs_delta) < 0.5
    # unparseable output (None), wrong length, NaN: lowest value of each range, never nan
    for bad in (None, np.ones(3), np.full(50, np.nan)):
        assert m.verifier_pearson_de(bad, ctrl, obs_delta) == -1.0
        assert m.verifier_rmse_de(bad, ctrl, obs_delta) == 0.0
        assert m.verifier_de_spearman(bad, ctrl, obs_delta) == 0.0
        assert m.verifier_pathway(bad, ctrl, obs_delta, weights) == 0.0
    # constant delta on the DE genes (e.g. the cell is the control): no correlation -> lowest
    assert m.verifier_pearson_de(ctrl.copy(), ctrl, obs_delta) == -1.0
