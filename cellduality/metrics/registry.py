"""The metric registry: every benchmark metric's function, name, direction and best value, in one place.

Following cell-eval's ``MetricInfo`` registry, every metric key that reaches a report has a
:class:`MetricInfo` with the function that computes it, a friendly label (``kNN@3 accuracy``, never
``knn_accuracy``), its direction, its best possible value and a one-line description. Tables take their
column headers, bold marks and number formats from here, so "↑ higher is better" is stated by the
registry instead of by prose next to each table, and code that asks "which baseline is strongest" or
"does this reference row really bound the models" uses the same direction the reader sees.

Rows of a task table have a *kind*: ``model``, ``baseline``, ``reference`` (real held-out cells scored
like a method: informative, but no bound: a model can beat it) and ``ceiling`` (an upper bound by
construction). :func:`ceiling_violations` finds the rows labelled ``ceiling`` that some other row beats,
and :func:`honest_kinds` relabels them ``reference`` before a report is written, so whatever a report
calls a ceiling is never below what it is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cellduality.metrics import classification, generation, pathways, perturbation

#: Kinds of table rows. ``ceiling`` is only kept where it bounds every other row (see honest_kinds).
KINDS = ("model", "baseline", "reference", "ceiling")


@dataclass(frozen=True)
class MetricInfo:
    """A metric's key, how people call it, which way is better, its best value, what it measures and
    the function that computes it.

    ``label`` may hold ``{k}`` / ``{n_de}`` placeholders filled from the task's parameters.
    ``higher_is_better`` is ``None`` where no direction applies (counts describe the sample, not a
    method). ``function`` computes the value per test set or per perturbation (the report averages the
    latter); ``None`` where the evaluation derives the value from others (the neighbourhood edit's
    statistics) or counts. ``ranked`` is ``False`` for metrics a table shows but does not rank (whether
    the answers had the right form says nothing of which method predicts best); ``count`` marks values
    shown as whole numbers.
    """

    key: str
    label: str
    higher_is_better: bool | None
    best: float | None
    description: str
    function: Callable[..., Any] | None = None
    ranked: bool = True
    count: bool = False

    @property
    def arrow(self) -> str:
        """`` ↑`` / `` ↓`` for the better direction, empty where there is none."""
        return {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]

    def title(self, **params: Any) -> str:
        """The friendly label with its placeholders filled (missing ones default to k=3, n_de=20)."""
        return self.label.format(**{"k": 3, "n_de": 20, **params})

    def header(self, **params: Any) -> str:
        """Table column header: label plus ``↑`` / ``↓`` for the better direction."""
        return self.title(**params) + self.arrow

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``; a non-finite value is never better than anything."""
        if self.higher_is_better is None or not _finite(a):
            return False
        if not _finite(b):
            return True
        return a > b if self.higher_is_better else a < b


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


_UP, _DOWN = True, False
METRICS: dict[str, MetricInfo] = {
    info.key: info
    for info in (
        MetricInfo(
            "accuracy",
            "accuracy",
            _UP,
            1.0,
            "share of test items answered with the true label",
            classification.accuracy,
        ),
        MetricInfo(
            "macro_f1",
            "macro-F1",
            _UP,
            1.0,
            "F1 averaged over the classes present in the test labels, each weighted equally",
            classification.macro_f1,
        ),
        MetricInfo(
            "valid_output_rate",
            "valid output",
            _UP,
            1.0,
            "share of answers naming a usable label or gene",
            classification.valid_output_rate,
            ranked=False,
        ),
        MetricInfo(
            "format_rate",
            "format",
            _UP,
            1.0,
            "share of completions exactly <think>…</think><answer>…</answer>",
            classification.format_rate,
            ranked=False,
        ),
        MetricInfo(
            "knn_accuracy",
            "kNN@{k} accuracy",
            _UP,
            1.0,
            "share of generated cells a {k}-NN classifier fitted on real test cells labels as prompted",
            generation.knn_accuracy,
        ),
        MetricInfo(
            "scfid",
            "scFID",
            _DOWN,
            0.0,
            "Fréchet distance of generated to real cells in PCA space",
            generation.scfid,
        ),
        MetricInfo(
            "rwjs_nearest",
            "RWJS to nearest real cell",
            _UP,
            1.0,
            "rank-weighted Jaccard similarity of a generated sentence to the closest real one",
            generation.rwjs_nearest,
        ),
        MetricInfo(
            "pearson_delta",
            "Pearson Δ all genes",
            _UP,
            1.0,
            "Pearson r of predicted vs observed change from control, over all genes",
            perturbation.pearson_delta,
        ),
        MetricInfo(
            "pearson_delta_de",
            "Pearson Δ top-{n_de} DE",
            _UP,
            1.0,
            "Pearson r of predicted vs observed change from control, on the top-{n_de} DE genes",
            perturbation.pearson_delta_de,
        ),
        MetricInfo(
            "rmse_de",
            "RMSE top-{n_de} DE",
            _DOWN,
            0.0,
            "error of the change on the DE genes",
            perturbation.rmse_de,
        ),
        MetricInfo(
            "de_spearman",
            "DE Spearman",
            _UP,
            1.0,
            "ordering of the DE genes' changes",
            perturbation.de_spearman,
        ),
        MetricInfo(
            "retrieval",
            "retrieval (0.5 = random)",
            _UP,
            1.0,
            "share of other perturbations the prediction resembles less than its own",
            perturbation.retrieval_scores,
        ),
        MetricInfo(
            "pathway_cosine",
            "PROGENy cosine",
            _UP,
            1.0,
            "cosine of pathway activities",
            pathways.pathway_agreement,
        ),
        MetricInfo(
            "pathway_pearson",
            "PROGENy Pearson",
            _UP,
            1.0,
            "Pearson r of pathway activities",
            pathways.pathway_agreement,
        ),
        # knowledge-graph neighbourhood editing: derived by the evaluation (cellduality.eval.neighbourhood)
        MetricInfo(
            "gain_vs_unedited",
            "Pearson Δ gain over unedited",
            _UP,
            None,
            "mean per-target Pearson Δ of the edited neighbourhood minus the unedited one's",
        ),
        MetricInfo(
            "valid_edit_fraction",
            "valid edits",
            _UP,
            1.0,
            "share of proposed additions (among the candidates) and removals (among the neighbours) allowed",
        ),
        MetricInfo("empty_edit_rate", "empty edits", None, None, "share of edits that change nothing"),
        MetricInfo("n", "n", None, None, "test examples", count=True),
        MetricInfo(
            "n_scored", "perturbations with a Pearson Δ", None, None, "perturbations scored", count=True
        ),
        MetricInfo(
            "n_perturbations", "perturbations", None, None, "perturbation groups in the test set", count=True
        ),
    )
}


def metric_info(key: str) -> MetricInfo:
    """The registry entry of ``key``; an unknown key gets its own name as label and no direction."""
    return METRICS.get(key) or MetricInfo(key, key, None, None, "")


def metric_label(key: str, **params: Any) -> str:
    """Friendly name of a metric key (``knn_accuracy`` -> ``kNN@3 accuracy``)."""
    return metric_info(key).title(**params)


class Scored(Protocol):
    """A table row (what the evaluation's ``MethodScore`` offers): a name, a kind, its metric values."""

    name: str
    kind: str
    metrics: dict[str, float]
    note: str


T = TypeVar("T")


def best_item(items: Iterable[T], key: str, value: Callable[[T], Any]) -> T | None:
    """The item whose ``value`` is best by metric ``key``'s direction, among finite values (first one on
    ties); ``None`` if none has one. Tables' rows, or (name, value) pairs alike."""
    info = metric_info(key)
    best: T | None = None
    best_value = 0.0
    for item in items:
        v = value(item)
        if _finite(v) and (best is None or info.better(float(v), best_value)):
            best, best_value = item, float(v)
    return best


def best_row(rows: Iterable[Scored], key: str) -> Scored | None:
    """The row with the best finite value of ``key`` (first one on ties); ``None`` if none has one."""
    return best_item(rows, key, lambda row: row.metrics.get(key))


def ceiling_violations(rows: Sequence[Scored], keys: Iterable[str]) -> dict[str, list[str]]:
    """Per row labelled ``ceiling``, the ``"metric: row"`` pairs where another row scores better.

    A ceiling claims no method can beat it; any such pair refutes the claim on this data.
    """
    keys = list(keys)
    out: dict[str, list[str]] = {}
    for ceiling in (r for r in rows if r.kind == "ceiling"):
        beaten = []
        for key in keys:
            info = metric_info(key)
            bound = ceiling.metrics.get(key)
            for other in rows:
                if other is ceiling or other.kind == "ceiling":
                    continue
                value = other.metrics.get(key)
                if _finite(value) and _finite(bound) and info.better(float(value), float(bound)):  # type: ignore[arg-type]
                    beaten.append(f"{info.title()}: {other.name}")
        if beaten:
            out[ceiling.name] = beaten
    return out


def honest_kinds(rows: Sequence[Scored], keys: Iterable[str]) -> list[str]:
    """Relabel every ``ceiling`` row that another row beats as ``reference``, saying so in its note.

    Returns the notes added. After this, every row still labelled ``ceiling`` scores at least as well as
    every other row on every keyed metric, which is what the word promises a reader.
    """
    added = []
    violations = ceiling_violations(rows, keys)
    for row in rows:
        if row.name in violations and row.kind == "ceiling":
            row.kind = "reference"
            text = (
                "not an upper bound on this data: beaten on "
                + "; ".join(violations[row.name][:4])
                + (" …" if len(violations[row.name]) > 4 else "")
            )
            row.note = f"{row.note}; {text}" if row.note else text
            added.append(f"{row.name}: {text}")
    return added


def describe_directions(keys: Iterable[str], **params: Any) -> str:
    """One line for a table legend: each column's friendly label and whether higher or lower is better."""
    parts = []
    for key in keys:
        info = metric_info(key)
        if info.higher_is_better is None:
            continue
        way = "higher is better" if info.higher_is_better else "lower is better"
        best = f", best {info.best:g}" if info.best is not None else ""
        parts.append(f"{info.title(**params)}: {way}{best}")
    return "; ".join(parts)


def registry_table(keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The registry as plain rows (for ``metrics.json`` and docs)."""
    use = list(keys) if keys is not None else list(METRICS)
    return [
        {
            "key": k,
            "label": metric_info(k).label,
            "higher_is_better": metric_info(k).higher_is_better,
            "best": metric_info(k).best,
            "description": metric_info(k).description,
        }
        for k in use
    ]


__all__ = [
    "KINDS",
    "METRICS",
    "MetricInfo",
    "best_item",
    "best_row",
    "ceiling_violations",
    "describe_directions",
    "honest_kinds",
    "metric_info",
    "metric_label",
    "registry_table",
]
