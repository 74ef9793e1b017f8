"""Speed of the evaluation metrics and baselines for 10,000 generated cells (model generation excluded).

Synthetic but realistically shaped data: log-normalised Poisson counts over 2,000 genes (named after real
PROGENy / GO genes, so pathway and GO look-ups do real work), 10 cell types for classification and
conditional generation, 20 genetic perturbations (5 of them doubles) for perturbation response. The
generated cells are noisy draws of the same kind, standing in for a model's decoded sentences.

    .venv/bin/python benchmarks/eval_speed.py                # defaults: 10,000 cells, target 30 s
    .venv/bin/python benchmarks/eval_speed.py --threads 1    # cap BLAS threads (shared / busy machines)

Prints the seconds of each part, the total and the target; exits 1 when the total misses the target.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from cellduality import metrics as m
from cellduality.metrics import baselines as b
from cellduality.metrics.knowledge import load_go_bp, load_progeny

TARGET_S = 30.0


def _log_normalised(rng: np.random.Generator, means: np.ndarray, n: int) -> np.ndarray:
    """n cells of Poisson counts around ``means`` with a per-cell size factor, then CP10k + log1p."""
    size = rng.lognormal(0.0, 0.3, size=(n, 1))
    counts = rng.poisson(means[None, :] * size).astype(np.float32)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    return np.log1p(counts / totals * 1e4)


def _sentences(x: np.ndarray, genes: np.ndarray, k: int) -> list[list[str]]:
    top = np.argpartition(-x, k, axis=1)[:, :k]
    order = np.take_along_axis(top, np.argsort(-np.take_along_axis(x, top, axis=1), axis=1), axis=1)
    return [genes[row].tolist() for row in order]


def make_data(n_cells: int, n_genes: int, n_classes: int, n_perts: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    progeny = load_progeny().index.tolist()
    annotated = [g for g, terms in load_go_bp().items() if terms and g not in set(progeny)]
    genes = np.asarray((progeny + annotated)[:n_genes], dtype=object)
    base = rng.lognormal(-1.0, 1.5, size=n_genes)

    class_means = base * rng.lognormal(0.0, 0.25, size=(n_classes, n_genes))
    classes = [f"type_{i}" for i in range(n_classes)]
    n_real = n_cells // 2
    real_y = rng.integers(0, n_classes, size=n_real)
    gen_y = rng.integers(0, n_classes, size=n_cells)
    real = np.empty((n_real, n_genes), dtype=np.float32)
    gen = np.empty((n_cells, n_genes), dtype=np.float32)
    for c in range(n_classes):
        real[real_y == c] = _log_normalised(rng, class_means[c], int((real_y == c).sum()))
        noisy = class_means[c] * rng.lognormal(0.0, 0.3, size=n_genes)
        gen[gen_y == c] = _log_normalised(rng, noisy, int((gen_y == c).sum()))

    targets = rng.choice(genes[:500], size=n_perts + 5, replace=False).tolist()
    perts = targets[: n_perts - 5] + [
        f"{targets[i]}+{targets[i + 1]}" for i in range(n_perts - 5, n_perts + 5, 2)
    ]
    effects = rng.lognormal(0.0, 0.4, size=(n_perts, n_genes))
    n_ctrl, n_obs = 1000, 300
    per_pert_gen = n_cells // n_perts
    ctrl = _log_normalised(rng, base, n_ctrl)
    obs = {p: _log_normalised(rng, base * effects[i], n_obs) for i, p in enumerate(perts)}
    pred = {
        p: _log_normalised(rng, base * effects[i] * rng.lognormal(0.0, 0.2, size=n_genes), per_pert_gen)
        for i, p in enumerate(perts)
    }
    completions = [
        f"<think>because</think><answer>{classes[c]}</answer>" for c in rng.integers(0, n_classes, n_cells)
    ]
    predictions = [
        None if i % 17 == 0 else c[c.index("<answer>") + 8 : -9] for i, c in enumerate(completions)
    ]
    return {
        "genes": genes,
        "classes": classes,
        "real": real,
        "real_y": np.asarray(classes, dtype=object)[real_y],
        "gen": gen,
        "gen_y": np.asarray(classes, dtype=object)[gen_y],
        "completions": completions,
        "predictions": predictions,
        "perts": perts,
        "ctrl": ctrl,
        "obs": obs,
        "pred": pred,
    }


def run(d: dict[str, Any]) -> list[tuple[str, float, float]]:
    """Time every part: (name, wall seconds, CPU seconds of this process)."""
    timings: list[tuple[str, float, float]] = []

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        timings.append((name, time.perf_counter() - start, time.process_time() - cpu))
        return out

    genes, classes = d["genes"], d["classes"]
    test_y = d["gen_y"].tolist()

    # classification: metrics on 10k predictions, baselines trained on the real cells, predicting 10k
    timed(
        "classification metrics (10k)",
        lambda: (
            m.classification_metrics(test_y, d["predictions"], classes, d["completions"]),
            m.confusion(test_y, d["predictions"], classes),
        ),
    )
    timed("baseline majority", lambda: b.majority_classifier().fit(d["real"], d["real_y"]).predict(d["gen"]))
    timed(
        "baseline kNN (PCA 50)",
        lambda: b.KNNExpressionClassifier().fit(d["real"], d["real_y"]).predict(d["gen"]),
    )
    timed(
        "baseline logistic regression",
        lambda: b.logistic_classifier().fit(d["real"], d["real_y"]).predict(d["gen"]),
    )

    # conditional generation
    embedder = timed("PCA embedder fit (real cells)", lambda: m.fit_pca_embedder(d["real"]))
    timed(
        "kNN@3 accuracy (10k)",
        lambda: m.knn_accuracy(d["real"], d["real_y"], d["gen"], d["gen_y"], 3, embedder),
    )
    timed(
        "scFID per class",
        lambda: m.scfid_by_condition(d["real"], d["real_y"], d["gen"], d["gen_y"], embedder),
    )
    real_s = _sentences(d["real"], genes, 100)
    gen_s = _sentences(d["gen"], genes, 100)
    timed(
        "RWJS to nearest real cell (10k x 100 genes)",
        lambda: m.rwjs_nearest(gen_s, d["gen_y"], real_s, d["real_y"]),
    )
    timed("baseline class-mean sentences", lambda: b.class_mean_sentences(d["real"], d["real_y"], genes, 100))

    # perturbation response
    perts, ctrl, obs, pred = d["perts"], d["ctrl"], d["obs"], d["pred"]
    weights = timed("PROGENy alignment", lambda: m.align_pathway_weights(genes))
    timed(
        "perturbation metrics (20 perts)",
        lambda: [
            m.perturbation_metrics(pred[p], ctrl, obs[p], genes, pathway_weights=weights) for p in perts
        ],
    )
    ctrl_mean = ctrl.mean(axis=0)
    pred_d = np.vstack([pred[p].mean(axis=0) - ctrl_mean for p in perts])
    obs_d = np.vstack([obs[p].mean(axis=0) - ctrl_mean for p in perts])
    timed("retrieval (20 perts)", lambda: m.retrieval_scores(pred_d, obs_d))
    pert_real = np.vstack([ctrl, *obs.values()])

    def pert_fid() -> list[float]:
        emb = m.fit_pca_embedder(pert_real)
        return [m.scfid(obs[p], pred[p], emb) for p in perts]

    timed("scFID per perturbation (incl. PCA fit)", pert_fid)
    train_x = np.vstack([ctrl, *obs.values()])
    train_p = ["control"] * len(ctrl) + [p for p in perts for _ in range(len(obs[p]))]

    def loo(model_factory: Callable[[], Any]) -> list[np.ndarray]:
        model = model_factory().fit(train_x, train_p)
        return [model.predict(p) for p in perts]

    timed(
        "baselines control + mean perturbation",
        lambda: (loo(b.ControlBaseline), loo(b.MeanPerturbationBaseline)),
    )
    timed("baseline GO neighbours (incl. GO load)", lambda: loo(b.GONeighbourBaseline))
    timed(
        "reproducibility ceiling (20 perts x 5 splits)",
        lambda: [b.split_half_reproducibility(obs[p], ctrl) for p in perts],
    )

    # verifier rewards: one call per generated cell (10k cells, as GRPO would score them)
    cells = np.vstack([pred[p] for p in perts])
    owner = [p for p in perts for _ in range(len(pred[p]))]
    obs_delta = {p: obs[p].mean(axis=0) - ctrl_mean for p in perts}
    de = {p: m.de_gene_indices(obs_delta[p], 20) for p in perts}

    def verify(fn: Callable[..., float], *extra: Any, use_de: bool = True) -> list[float]:
        if use_de:
            return [fn(c, ctrl_mean, obs_delta[p], de[p]) for c, p in zip(cells, owner, strict=True)]
        return [fn(c, ctrl_mean, obs_delta[p], *extra) for c, p in zip(cells, owner, strict=True)]

    timed(f"verifier_pearson_de ({len(cells)} calls)", lambda: verify(m.verifier_pearson_de))
    timed(f"verifier_rmse_de ({len(cells)} calls)", lambda: verify(m.verifier_rmse_de))
    timed(f"verifier_de_spearman ({len(cells)} calls)", lambda: verify(m.verifier_de_spearman))
    timed(f"verifier_pathway ({len(cells)} calls)", lambda: verify(m.verifier_pathway, weights, use_de=False))
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10_000, help="generated cells (default 10,000)")
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--perturbations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="cap BLAS/OpenMP threads (threadpoolctl)")
    args = parser.parse_args(argv)
    if args.perturbations < 6:
        parser.error("--perturbations must be at least 6 (5 of them are doubles)")

    start = time.perf_counter()
    # one-off import costs (seconds on a busy machine), paid once per process: not timed
    for module in (
        "scipy.linalg",
        "scipy.stats",
        "sklearn.decomposition",
        "sklearn.linear_model",
        "sklearn.metrics",
        "sklearn.neighbors",
    ):
        importlib.import_module(module)

    imports = time.perf_counter() - start
    start = time.perf_counter()
    data = make_data(args.cells, args.genes, args.classes, args.perturbations, args.seed)
    setup = time.perf_counter() - start
    print(
        f"data: {args.cells} generated cells, {len(data['real'])} real, {args.genes} genes, "
        f"{args.classes} classes, {args.perturbations} perturbations "
        f"(not timed: scipy/sklearn imports {imports:.1f} s, data synthesis {setup:.1f} s)"
    )
    if args.threads is not None:
        from threadpoolctl import threadpool_limits

        limiter: Any = threadpool_limits(limits=args.threads)
    else:
        limiter = nullcontext()
    with limiter:
        timings = run(data)
    width = max(len(name) for name, _, _ in timings)
    print(f"  {'part':<{width}}  {'wall':>8}  {'cpu':>8}")
    for name, wall, cpu in timings:
        print(f"  {name:<{width}}  {wall:7.2f}s  {cpu:7.2f}s")
    total = sum(wall for _, wall, _ in timings)
    total_cpu = sum(cpu for _, _, cpu in timings)
    print(f"  {'total':<{width}}  {total:7.2f}s  {total_cpu:7.2f}s")
    verdict = "OK" if total < TARGET_S else "TOO SLOW"
    print(
        f"wall total {total:.1f} s, target < {TARGET_S:.0f} s ({total / TARGET_S:.2f}x of target): {verdict}"
    )
    print("(cpu = this process's CPU time; wall far above it means a shared machine or waiting BLAS threads)")
    return 0 if total < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
