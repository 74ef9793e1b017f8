"""Baselines of the benchmark evaluation: hand-computed values on tiny arrays and real-data checks
(pbmc68k_reduced for classification, the embedded Norman 2019 subset for perturbation response)."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellduality.metrics import baselines as b
from cellduality.metrics.knowledge import GO_BP_ROOT, load_go_bp, load_go_term_names
from cellduality.metrics.perturbation import pearson_delta, perturbation_metrics
from cellduality.metrics.statistics import spearman_brown

NORMAN = Path(__file__).resolve().parents[1] / "cellduality" / "data" / "resources" / "norman_devel.h5ad"

# ------------------------------------------------------------------------------------------ classification


@pytest.fixture(scope="module")
def pbmc_split() -> tuple[sp.csr_matrix, np.ndarray, sp.csr_matrix, np.ndarray]:
    import scanpy as sc
    from sklearn.model_selection import train_test_split

    adata = sc.datasets.pbmc68k_reduced()
    x = adata.raw.X  # log-normalised; .X is z-scored
    y = adata.obs["bulk_labels"].astype(str).to_numpy()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_train, y_train, x_test, y_test


def test_classifiers_beat_majority_on_pbmc(pbmc_split) -> None:
    from threadpoolctl import threadpool_limits

    x_train, y_train, x_test, y_test = pbmc_split
    majority = b.majority_classifier().fit(x_train, y_train).predict(x_test)
    assert set(majority) == {"Dendritic"}  # the most frequent bulk label (240 of 700)
    acc_majority = float(np.mean(majority == y_test))
    # one BLAS thread: these matrices are small, and threads only wait for each other on a shared CPU
    with threadpool_limits(limits=1):
        acc_logreg = float(np.mean(b.logistic_classifier().fit(x_train, y_train).predict(x_test) == y_test))
        acc_knn = float(np.mean(b.KNNExpressionClassifier().fit(x_train, y_train).predict(x_test) == y_test))
    assert acc_majority == pytest.approx(0.343, abs=0.01)
    assert acc_logreg > acc_majority + 0.2
    assert acc_knn > acc_majority + 0.2


def test_knn_classifier_tiny_training_sets() -> None:
    x = np.array([[0.0, 0.0], [10.0, 10.0]])
    knn = b.KNNExpressionClassifier(n_neighbors=5).fit(x, ["a", "b"])  # k and PCA capped by 2 cells
    assert knn.predict(np.array([[1.0, 1.0], [9.0, 9.0]])).tolist() == ["a", "a"]  # k = 2 ties -> first
    one = b.KNNExpressionClassifier(n_neighbors=1).fit(x, ["a", "b"])
    assert one.predict(np.array([[1.0, 1.0], [9.0, 9.0]])).tolist() == ["a", "b"]


# ------------------------------------------------------------------------------------------ generation


def test_group_means_and_class_mean_sentences() -> None:
    x = sp.csr_matrix(np.array([[3.0, 0.0, 1.0], [1.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))
    names, means = b.group_means(x, ["a", "a", "b"])
    assert names == ["a", "b"]
    # a: ((3 + 1) / 2, 0, (1 + 1) / 2) = (2, 0, 1); b: (0, 2, 0)
    np.testing.assert_allclose(means, [[2.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    sentences = b.class_mean_sentences(x, ["a", "a", "b"], ["G1", "G2", "G3"], n_genes=5)
    assert sentences == {"a": ["G1", "G3"], "b": ["G2"]}  # zero-mean genes left out
    assert b.class_mean_sentences(x, ["a", "a", "b"], ["G1", "G2", "G3"], n_genes=1)["a"] == ["G1"]


# ------------------------------------------------------------------------------------------ perturbation


def _toy_perturbations() -> tuple[np.ndarray, list[str]]:
    # 2 control cells around c = (1, 1, 1); A: delta (1, 0, 0); C: (0, 0, 3); B+C: (0, 2, 0)
    x = np.array(
        [
            [1.0, 1, 1],
            [1, 1, 1],
            [2, 1, 1],
            [2, 1, 1],
            [1, 1, 4],
            [1, 3, 1],
        ]
    )
    return x, ["control", "control", "A", "A", "C", "B+C"]


def test_control_and_mean_perturbation_baselines_by_hand() -> None:
    x, perts = _toy_perturbations()
    np.testing.assert_allclose(b.ControlBaseline().fit(x, perts).predict("Z"), [1, 1, 1])
    mean = b.MeanPerturbationBaseline().fit(x, perts)
    # unseen Z: c + ((1,0,0) + (0,0,3) + (0,2,0)) / 3 = (4/3, 5/3, 2)
    np.testing.assert_allclose(mean.predict("Z"), [4 / 3, 5 / 3, 2.0])
    # A itself is left out: c + ((0,0,3) + (0,2,0)) / 2 = (1, 2, 2.5)
    np.testing.assert_allclose(mean.predict("A"), [1.0, 2.0, 2.5])
    with pytest.raises(ValueError, match="no 'control' cells"):
        b.MeanPerturbationBaseline().fit(x[2:], perts[2:])


def test_training_mean_baseline_by_hand() -> None:
    """A trained perturbation gets its own training response; an unseen one the mean of all of them."""
    x, perts = _toy_perturbations()
    model = b.TrainingMeanBaseline().fit(x, perts)
    np.testing.assert_allclose(model.predict("A"), [2.0, 1.0, 1.0])  # c + (1, 0, 0)
    np.testing.assert_allclose(model.predict("Z"), [4 / 3, 5 / 3, 2.0])


def test_go_neighbour_baseline_by_hand() -> None:
    x, perts = _toy_perturbations()
    go = {
        "A": frozenset({"t1"}),
        "b": frozenset({"t1"}),
        "C": frozenset({"t2"}),
        "D": frozenset({GO_BP_ROOT}),
    }
    model = b.GONeighbourBaseline(go=go).fit(x, perts)
    # query B: A shares t1; B+C shares the target B (and t1 through b) -> c + ((1,0,0) + (0,2,0)) / 2
    assert model.neighbours("B") == ["A", "B+C"]
    np.testing.assert_allclose(model.predict("B"), [1.5, 2.0, 1.0])
    # double A+C: A (t1), C (t2), B+C (t1 via B, C shared) are all neighbours
    assert model.neighbours("A+C") == ["A", "C", "B+C"]
    # D only has the root term, which is dropped: no neighbour -> mean perturbation fallback
    assert model.neighbours("D") == []
    np.testing.assert_allclose(model.predict("D"), b.MeanPerturbationBaseline().fit(x, perts).predict("D"))
    assert b.perturbation_targets("a+ctrl") == {"A"}
    assert b.perturbation_targets("KLF1+SET") == {"KLF1", "SET"}


def test_go_bp_package_data() -> None:
    go = load_go_bp()
    assert len(go) == 18903
    assert all(GO_BP_ROOT not in terms for terms in go.values())
    assert GO_BP_ROOT in load_go_bp(drop_root=False)["A1BG"]
    assert load_go_bp() is go  # parsed once
    names = load_go_term_names()
    assert names["GO:0008150"] == "biological_process"
    assert all(term in names for term in go["MAPK1"])


def test_spearman_brown_and_ceiling_synthetic() -> None:
    assert spearman_brown(0.5) == pytest.approx(2 / 3)  # 2 * 0.5 / (1 + 0.5)
    assert spearman_brown(0.0) == 0.0
    # negative split-half r: left uncorrected (2r/(1+r) would give -3 for -0.6, below -1)
    assert spearman_brown(-0.6) == pytest.approx(-0.6) and spearman_brown(-1.0) == -1.0
    assert math.isnan(spearman_brown(float("nan")))
    assert all(-1.0 <= spearman_brown(r) <= 1.0 for r in np.linspace(-1, 1, 41))
    rng = np.random.default_rng(0)
    ctrl = rng.normal(size=(2000, 200))
    effect = rng.normal(scale=2.0, size=200)
    strong = rng.normal(size=(200, 200)) + effect
    null = rng.normal(size=(200, 200))  # no effect; the large control keeps shared noise small
    assert b.split_half_reproducibility(strong, ctrl) > 0.98
    assert abs(b.split_half_reproducibility(null, ctrl)) < 0.3
    assert math.isnan(b.split_half_reproducibility(strong[:1], ctrl))
    # halves that anti-correlate (one half up, the other down) stay within [-1, 1]
    flip = np.vstack([ctrl[:3] + effect, ctrl[3:6] - effect])
    for seed in range(5):
        value = b.split_half_reproducibility(flip, ctrl[6:], n_splits=1, seed=seed)
        assert -1.0 <= value <= 1.0


@pytest.fixture(scope="module")
def norman() -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    adata = ad.read_h5ad(NORMAN)
    adata = adata[adata.obs["dataset"] == "norman19"]  # K562 cells with their own controls
    return sp.csr_matrix(adata.X), adata.obs["perturbation"].astype(str).to_numpy(), list(adata.var_names)


def test_norman_baselines_give_finite_pearson_delta(norman) -> None:
    x, perts, genes = norman
    ctrl = x[perts == "control"]
    held_out = ["KLF1", "SET+KLF1", "MAP2K3+MAP2K6", "CEBPE+RUNX1T1", "TMSB4X", "FOXL2+HOXB9"]
    for name in held_out:
        train = perts != name
        obs = x[perts == name]
        for model in (b.MeanPerturbationBaseline(), b.GONeighbourBaseline()):
            pred = model.fit(x[train], perts[train]).predict(name)
            got = perturbation_metrics(pred, ctrl, obs, genes)
            assert math.isfinite(got["pearson_delta"]), (name, type(model).__name__)
            assert math.isfinite(got["pearson_delta_de"]), (name, type(model).__name__)
        control = b.ControlBaseline().fit(x[train], perts[train]).predict(name)
        assert math.isnan(pearson_delta(control, ctrl, obs))  # predicts no change at all
    # GO neighbourhoods on real annotations: KLF1 and SET+KLF1 share the target KLF1
    model = b.GONeighbourBaseline().fit(x, perts)
    assert "KLF1" in model.neighbours("SET+KLF1")
    assert "SET+KLF1" in model.neighbours("KLF1")


def test_norman_reproducibility_ceiling(norman) -> None:
    x, perts, _ = norman
    ctrl = x[perts == "control"]
    names = [p for p in dict.fromkeys(perts) if p != "control" and (perts == p).sum() >= 100]
    ceilings = {p: b.split_half_reproducibility(x[perts == p], ctrl, n_splits=3) for p in names}
    assert len(ceilings) >= 30
    assert np.median(list(ceilings.values())) > 0.85
    for strong in ("KLF1", "SET+KLF1", "CBL+CNN1"):  # large, well-sampled effects
        assert ceilings[strong] > 0.95
    # a null "perturbation" (half of the controls against the other half) is far lower: shared-control
    # noise alone gives about 2 * (1/3) / (1 + 1/3) = 0.5 here
    null = b.split_half_reproducibility(ctrl[:50], ctrl[50:], n_splits=3)
    assert null < 0.7
    assert null < min(ceilings[s] for s in ("KLF1", "SET+KLF1", "CBL+CNN1")) - 0.3
