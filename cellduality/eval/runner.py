"""The benchmark evaluation: generate with each model, score every task, add baselines, write the report.

``run_eval(prepared, EvalConfig(...))`` is what ``cellduality eval`` calls. Its steps, in order:

1. read the split of the prepared examples (capped per task with a seeded sample when asked);
2. per model: completions through the on-disk cache (only missing ones are generated, so a model added
   to a comparison costs only its own generation); with ``self_verify = N`` also N sampled answers per
   example, each checked by the model's own answer to its dual task (:mod:`cellduality.tasks.dual`),
   keeping the best: reported as a separate row next to the plain (greedy) model;
3. per task: the models and the baselines scored by the same code (:mod:`.scoring`), baselines fitted
   on the real cells of the *train* examples of the same prepared folder and applied to the test cells;
4. ``metrics.json``, ``report.md`` and PNG plots in the output folder (:mod:`.report`), plus each
   model's parsed predictions as JSONL.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cellduality.data.schema import TASKS, DataError
from cellduality.eval.perturbation_rows import perturbation_baselines, reproducibility
from cellduality.eval.scoring import (
    GenerationReference,
    PerturbationReference,
    TaskResult,
    classification_labels,
    classification_predictions,
    generated_sentences,
    score_classification,
)
from cellduality.inference.cache import entry_key, open_cache, path_fingerprint
from cellduality.inference.engine import best_by_dual, dual_confidence
from cellduality.inference.generate import (
    Backend,
    BackendFactory,
    GenerationSettings,
    ModelSpec,
    backend_name,
    generate_cached,
    load_backend,
)
from cellduality.tasks import PreparedTasks, load_prepared
from cellduality.tasks.dual import CLASSIFICATION_TASKS, forward_answer
from cellduality.tasks.real_data import RealData, load_real_data

Row = dict[str, Any]


@dataclass
class EvalConfig:
    """What to evaluate and how. Paths may be ``str`` or ``Path``.

    ``max_examples`` caps the examples per task (seeded sample, the same for every model).
    ``self_verify`` = N > 1 adds, per model, the "N samples, keep the one whose dual task the model
    solves best" row; the samples use ``self_verify_temperature``. ``data_path``, ``layer`` and
    ``gene_symbols``: how to re-read the real cells; ``None`` takes what ``prepare`` recorded in the
    prepared folder (:func:`cellduality.tasks.real_data.load_real_data`).
    """

    out_dir: Path
    models: list[ModelSpec] = field(default_factory=list)
    split: str = "test"
    tasks: Sequence[str] | None = None
    max_examples: int | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    self_verify: int = 0
    self_verify_temperature: float = 1.0
    baselines: bool = True
    cache_dir: Path | None = None
    backend: str = "auto"
    data_path: str | None = None
    layer: str | None = None
    gene_symbols: str | None = None
    knn_k: int = 3
    n_de: int = 20
    seed: int = 0
    plots: bool = True
    progress: bool = True
    #: also score perturbation predictions with cell-eval (the optional ``.[eval]`` extra)
    cell_eval: bool = False


@dataclass
class EvalResult:
    """The scored tasks, the run's description (as in ``metrics.json``) and the files written.

    ``info['models'][i]['generated']`` says whether that model had to generate anything (False: every
    completion came from the cache and the model was never loaded).
    """

    tasks: dict[str, TaskResult]
    info: dict[str, Any]
    files: dict[str, Path]


# ----------------------------------------------------------------------------------------------------
# examples


def _cap(rows: list[Row], limit: int | None, seed: int, task: str) -> list[Row]:
    if limit is None or len(rows) <= limit:
        return rows
    rng = np.random.default_rng([seed, TASKS.index(task) if task in TASKS else 99])
    return [rows[i] for i in np.sort(rng.choice(len(rows), size=limit, replace=False))]


def select_rows(
    prepared: PreparedTasks, split: str, tasks: Sequence[str] | None, limit: int | None, seed: int
) -> dict[str, list[Row]]:
    """The examples of ``split`` per task, in the suite's task order, capped at ``limit`` per task."""
    if split not in prepared.datasets:
        raise DataError(f"the prepared folder has no split {split!r}; splits: {', '.join(prepared.datasets)}")
    rows = prepared.datasets[split].to_list()
    present = [t for t in TASKS if any(r["task"] == t for r in rows)]
    wanted = list(tasks) if tasks else present
    unknown = [t for t in wanted if t not in TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; tasks are {', '.join(TASKS)}")
    absent = [t for t in wanted if t not in present]
    if absent:
        raise DataError(
            f"split {split!r} has no example of task(s) {absent}; tasks present: {', '.join(present) or '(none)'}"
        )
    return {t: _cap([r for r in rows if r["task"] == t], limit, seed, t) for t in wanted}


# ----------------------------------------------------------------------------------------------------
# generation


class ModelRunner:
    """One model's completions through the cache; the model is loaded on the first cache miss only."""

    def __init__(
        self,
        spec: ModelSpec,
        config: EvalConfig,
        dataset: str,
        factory: BackendFactory | None = None,
    ) -> None:
        self.spec = spec.resolved()
        self.config = config
        self.dataset = dataset
        self.factory = factory or (lambda s, g: load_backend(s, g, config.backend))
        self._backend: Backend | None = None
        self.loaded = False

    def _get_backend(self) -> Backend:
        if self._backend is None:
            self._backend = self.factory(self.spec, self.config.generation)
            self.loaded = True
        return self._backend

    def identity(self, settings: GenerationSettings, kind: str) -> dict[str, Any]:
        """What the cached completions depend on: model files, adapter, data, split, decoding."""
        return {
            "kind": kind,
            "model": path_fingerprint(self.spec.path),
            "adapter": path_fingerprint(self.spec.adapter),
            "dataset": self.dataset,
            "split": self.config.split,
            "generation": settings.identity(),
            "backend": backend_name(self.config.backend),
        }

    def complete(
        self, prompts: Sequence[Any], keys: Sequence[str], settings: GenerationSettings, kind: str
    ) -> list[str]:
        cache_dir = self.config.cache_dir or Path(self.config.out_dir) / "cache"
        # the file is named after the model's folder, not its display name: renaming keeps the cache
        stem = Path(self.spec.adapter or self.spec.path).name or "model"
        cache = open_cache(cache_dir, f"{stem}-{kind}", self.identity(settings, kind))
        desc = f"{self.spec.label} ({kind})"
        return generate_cached(
            prompts, keys, cache, settings, self._get_backend, desc=desc, progress=self.config.progress
        )

    def forward(self, rows: Sequence[Row]) -> list[str]:
        """The plain answer to every example (greedy unless the settings sample)."""
        keys = [entry_key(r["id"], r["prompt"]) for r in rows]
        return self.complete([r["prompt"] for r in rows], keys, self.config.generation, "forward")

    def self_verify(
        self, rows: Sequence[Row], n: int, vocabulary: Mapping[str, str]
    ) -> tuple[list[str], dict[str, float]]:
        """N sampled answers per example; keep the one whose dual the model itself solves best.

        Dual answers are greedy. A sample that does not parse gets dual score 0 (no dual prompt), as in
        the dual reward, but loses a tie to one that parses; ties otherwise keep the earliest sample, so
        with N = 1 this is plain sampling.
        """
        cfg = self.config
        sampling = replace(cfg.generation, temperature=cfg.self_verify_temperature or 1.0)
        prompts = [r["prompt"] for r in rows for _ in range(n)]
        keys = [entry_key(r["id"], r["prompt"], j) for r in rows for j in range(n)]
        samples = self.complete(prompts, keys, sampling, f"samples{n}")
        greedy = replace(cfg.generation, temperature=0.0)

        def answer(dual_prompts: list[Any], owners: list[int]) -> list[str]:
            return self.complete(dual_prompts, [entry_key("dual", p) for p in dual_prompts], greedy, "dual")

        flat = [r for r in rows for _ in range(n)]
        scores, parsed = dual_confidence(flat, samples, answer, vocabulary, cfg.seed)
        scores, parsed = scores.reshape(len(rows), n), parsed.reshape(len(rows), n)
        best = best_by_dual(scores, parsed)
        chosen = [samples[i * n + int(j)] for i, j in enumerate(best)]
        stats = {
            "dual_score_chosen": float(scores.max(axis=1).mean()) if len(rows) else float("nan"),
            "any_sample_valid": float(parsed.any(axis=1).mean()) if len(rows) else float("nan"),
            "changed_from_first": float((best != 0).mean()) if len(rows) else float("nan"),
        }
        return chosen, stats


# ----------------------------------------------------------------------------------------------------
# baselines (fitted on the real cells of the train examples)


def _train_cells(train_rows: Sequence[Row]) -> tuple[list[str], list[str]]:
    return [r["cell_id"] for r in train_rows], [str(r.get("answer", "")) for r in train_rows]


def classification_baselines(
    rows: Sequence[Row], train_rows: Sequence[Row], real: RealData
) -> tuple[list[tuple[str, list[str]]], str]:
    """Majority / kNN / logistic-regression labels for the test cells, from their real expression."""
    from cellduality.metrics import baselines as b

    if not train_rows:
        return [], "no train examples of this task in the prepared folder: classification baselines skipped"
    ids, labels = _train_cells(train_rows)
    x_train, x_test = real.expression(ids), real.expression([r["cell_id"] for r in rows])
    out = [("majority class", list(b.majority_classifier().fit(x_train, labels).predict(x_test)))]
    out.append(("kNN on expression", list(b.KNNExpressionClassifier().fit(x_train, labels).predict(x_test))))
    if len(set(labels)) >= 2:
        out.append(
            ("logistic regression", list(b.logistic_classifier().fit(x_train, labels).predict(x_test)))
        )
    return [(name, [str(p) for p in preds]) for name, preds in out], ""


def class_mean_baseline(
    rows: Sequence[Row], train_rows: Sequence[Row], real: RealData
) -> tuple[list[list[str]], str]:
    """Per example, the sentence of the mean training cell of its type (empty for an unseen type)."""
    from cellduality.metrics.baselines import class_mean_sentences

    if not train_rows:
        return [[] for _ in rows], "no train examples: the class-mean sentence is empty"
    ids = [r["cell_id"] for r in train_rows]
    labels = [str(r["condition"]) for r in train_rows]
    n = max((int(r.get("n_genes") or 0) for r in rows), default=0) or 100
    means = class_mean_sentences(real.expression(ids), labels, real.genes, n)
    unseen = sorted({str(r["condition"]) for r in rows} - set(means))
    note = f"types without train cells (empty sentence): {', '.join(unseen)}" if unseen else ""
    return [means.get(str(r["condition"]), [])[: int(r.get("n_genes") or n)] for r in rows], note


# ----------------------------------------------------------------------------------------------------
# scoring a task


def score_task(
    task: str,
    rows: Sequence[Row],
    train_rows: Sequence[Row],
    outputs: Mapping[str, Sequence[str]],
    real: RealData | None,
    config: EvalConfig,
) -> TaskResult:
    """Every model's completions and every baseline, scored on the examples of one task."""
    result = TaskResult(task, len(rows))
    if task in CLASSIFICATION_TASKS:
        labels = classification_labels(rows)
        result.labels = labels
        for name, comps in outputs.items():
            preds = classification_predictions(rows, comps)
            result.methods.append(score_classification(name, "model", rows, preds, labels, comps))
        if config.baselines and real is not None and rows:
            found, note = classification_baselines(rows, train_rows, real)
            for name, preds in found:
                result.methods.append(score_classification(name, "baseline", rows, preds, labels))
            if note:
                result.info["note"] = note
        return result
    if real is None:
        raise DataError(f"task {task!r} needs the real cells: the dataset could not be read")
    if task == "generation":
        ref = GenerationReference(rows, real, k=config.knn_k, seed=config.seed)
        for name, comps in outputs.items():
            result.methods.append(
                ref.score(name, "model", generated_sentences(rows, comps, real.vocabulary), comps)
            )
        if config.baselines and rows:
            sentences, note = class_mean_baseline(rows, train_rows, real)
            result.methods.append(ref.score("class-mean sentence", "baseline", sentences))
            result.methods[-1].note = note
            real_sentences = [str(r.get("answer", "")).split() for r in rows]
            score = ref.score("real cells' own sentences", "reference", real_sentences)
            score.note = (
                "reference, not an upper bound: the held-out cells' true sentences through the same inverse "
                "fit as the models, i.e. what real cells score; kNN and scFID reward typical cells, so a "
                "model (or the class mean) generating prototypes can score above real, varied cells"
            )
            result.methods.append(score)
        result.reference_points = ref.reference_points
        result.reference_labels = list(ref.conditions)
        result.info.update(k=config.knn_k, fit_r2=float(real.fit.r2))
        return result
    if task == "perturbation":
        ref = PerturbationReference(rows, real, n_de=config.n_de, seed=config.seed)
        for name, comps in outputs.items():
            sentences = generated_sentences(rows, comps, real.vocabulary)
            result.methods.append(ref.score_sentences(name, "model", sentences, comps))
        if config.baselines and rows:
            copy = ref.score_sentences(
                "control cell's sentence", "baseline", [list(r["cell_genes"]) for r in rows]
            )
            copy.note = (
                "the prompt's control cell returned unchanged, through the same inverse fit as the models"
            )
            result.methods.append(copy)
            result.methods.extend(perturbation_baselines(ref, train_rows, real))
            result.methods.append(reproducibility(ref, config.seed))
        if config.cell_eval and rows:
            from cellduality.eval.cell_eval import add_to_result

            methods = {n: generated_sentences(rows, c, real.vocabulary) for n, c in outputs.items()}
            methods["control cell's sentence"] = [list(r["cell_genes"]) for r in rows]
            add_to_result(result, rows, methods, real, config.n_de)
        result.reference_points = ref.reference_points
        result.reference_labels = ref.reference_labels
        result.info.update(
            n_de=config.n_de,
            pathway_genes=int(ref.weights.n_shared) if ref.weights is not None else 0,
            fit_r2=float(real.fit.r2),
            perturbations=ref.groups,
        )
        return result
    if task == "neighbourhood":
        from cellduality.eval.neighbourhood import score_neighbourhood

        return score_neighbourhood(rows, outputs, real, config)
    raise DataError(f"no scoring for task {task!r}")


# ----------------------------------------------------------------------------------------------------
# the whole run


def _unique_labels(specs: Sequence[ModelSpec]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        label = spec.resolved().label
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _write_predictions(
    out: Path, label: str, rows: Sequence[Row], comps: Sequence[str], vocab: Mapping[str, str]
) -> Path:
    path = out / "predictions" / f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in label)}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row, comp in zip(rows, comps, strict=True):
            item = {
                "id": row["id"],
                "task": row["task"],
                "answer": row.get("answer", ""),
                "prediction": forward_answer(row, comp, vocab),
                "completion": comp,
            }
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return path


def run_eval(
    prepared: PreparedTasks | str | Path,
    config: EvalConfig,
    *,
    real: RealData | None = None,
    backend_factory: BackendFactory | None = None,
) -> EvalResult:
    """Evaluate ``config.models`` (and the baselines) on a prepared folder; write the report.

    ``real`` skips re-reading the dataset (the CLI passes it when it has just built the examples);
    ``backend_factory(spec, settings)`` replaces :func:`.generate.load_backend` (tests count calls).
    """
    from cellduality.eval.report import write_report

    source = str(prepared) if not isinstance(prepared, PreparedTasks) else None
    if not isinstance(prepared, PreparedTasks):
        prepared = load_prepared(prepared)
    meta = prepared.meta
    if config.self_verify == 1:
        raise ValueError("--self-verify needs N >= 2 samples to choose from")
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_task = select_rows(prepared, config.split, config.tasks, config.max_examples, config.seed)
    train_by_task: dict[str, list[Row]] = {}
    if config.baselines and "train" in prepared.datasets and config.split != "train":
        train = prepared.datasets["train"].to_list()
        train_by_task = {t: [r for r in train if r["task"] == t] for t in by_task}
    needs_real = any(t not in CLASSIFICATION_TASKS for t in by_task) or config.baselines
    if real is None and needs_real and any(by_task.values()):
        real = load_real_data(meta, config.data_path, layer=config.layer, gene_symbols=config.gene_symbols)
    from cellduality.parsing import gene_vocabulary

    vocabulary = real.vocabulary if real is not None else gene_vocabulary(meta.get("genes") or [])
    flat = [r for t in by_task for r in by_task[t]]
    from cellduality.modeling.checkpoint import sentence_mismatch

    warnings = [
        w
        for spec in config.models
        if (
            w := sentence_mismatch(
                spec.resolved().adapter or spec.path,
                meta,
                f"these examples ({source or meta.get('dataset')})",
            )
        )
    ]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    outputs: dict[str, dict[str, list[str]]] = {t: {} for t in by_task}
    models_info = []
    files: dict[str, Path] = {}
    for spec, label in zip(config.models, _unique_labels(config.models), strict=True):
        runner = ModelRunner(spec, config, str(meta.get("dataset", "")), backend_factory)
        comps = runner.forward(flat)
        files[f"predictions:{label}"] = _write_predictions(out, label, flat, comps, vocabulary)
        _split_by_task(outputs, by_task, label, comps)
        info: dict[str, Any] = {"name": label, "path": runner.spec.path, "adapter": runner.spec.adapter}
        if config.self_verify >= 2:
            chosen, stats = runner.self_verify(flat, config.self_verify, vocabulary)
            sv_label = f"{label} + self-verify@{config.self_verify}"
            _split_by_task(outputs, by_task, sv_label, chosen)
            info["self_verify"] = stats
        info["generated"] = runner.loaded
        models_info.append(info)
    tasks = {
        t: score_task(t, by_task[t], train_by_task.get(t, []), outputs[t], real, config) for t in by_task
    }
    run_info = {
        "dataset": meta.get("dataset"),
        "prepared": source,
        "split": config.split,
        "split_mode": {t: (meta.get("split") or {}).get(t, {}).get("mode") for t in by_task},
        "n_examples": {t: len(r) for t, r in by_task.items()},
        "models": models_info,
        "generation": {**asdict(config.generation), "backend": backend_name(config.backend)},
        "self_verify": config.self_verify,
        "fit": meta.get("fit"),
        "notes": meta.get("notes", []),
        "warnings": warnings,
        "baselines": config.baselines,
    }
    files.update(write_report(tasks, run_info, out, plots=config.plots))
    return EvalResult(tasks, run_info, files)


def _split_by_task(
    outputs: dict[str, dict[str, list[str]]],
    by_task: Mapping[str, list[Row]],
    label: str,
    comps: Sequence[str],
) -> None:
    start = 0
    for task, rows in by_task.items():
        outputs[task][label] = list(comps[start : start + len(rows)])
        start += len(rows)


__all__ = [
    "EvalConfig",
    "EvalResult",
    "ModelRunner",
    "class_mean_baseline",
    "classification_baselines",
    "run_eval",
    "score_task",
    "select_rows",
]


def run_eval_many(folders: Sequence[str | Path], config: EvalConfig) -> dict[str, EvalResult]:
    """One evaluation per prepared folder, into ``config.out_dir/<folder name>``.

    The folders share one generation cache (``config.cache_dir``, default ``out_dir/cache``), so a
    model is loaded and its completions kept in one place whatever the number of datasets.
    """
    names = [Path(f).name for f in folders]
    if len(set(names)) != len(names):
        raise DataError(f"prepared folders need distinct names, got {names}")
    out = Path(config.out_dir)
    shared = replace(config, cache_dir=config.cache_dir or out / "cache")
    return {
        name: run_eval(folder, replace(shared, out_dir=out / name))
        for folder, name in zip(folders, names, strict=True)
    }
