"""Knowledge-graph neighbourhood editing: the graph-neighbour perturbation predictor, refined by the policy.

The graph-neighbour predictor says: the response to perturbing a target gene is the mean training
response (delta from control) of the target's knowledge-graph neighbours that were perturbed in
training. It beats many deep models out of distribution; a policy that *edits* the neighbourhood
(removes neighbours whose response should differ, adds other training perturbations whose response
should be similar) can do better. This module builds the task; the rewards are in
``cellduality.rewards.neighbourhood`` and the evaluation in ``cellduality.eval.neighbourhood``.

What ``cellduality prepare --tasks neighbourhood --split ood`` writes, per dataset:

* one example per (target, cell context): ``train`` rows for the training perturbations (leave one
  out: a target is never in its own neighbourhood nor among its candidates), ``test`` rows for the
  held-out ones. ``condition`` is the target, ``neighbours`` its graph neighbours perturbed in training
  in the same context (at most ``max_neighbours``: the heaviest edges first, a seeded choice when the
  graph has no weights), ``candidates`` the other training perturbations of the context it may add (at
  most ``max_additions``: neighbours cut by the cap first, then a seeded choice). ``answer`` (train rows)
  is a greedy edit that improves the Pearson delta on the target's *training* delta, the reference an
  SFT teacher may imitate; test rows have no answer;
* the table ``neighbourhood_deltas`` (``PreparedTasks.tables``): for every training perturbation and
  context, its mean training delta (its train cells minus the context's train control cells) over the
  prepared genes. The gain reward reads only this table, i.e. training data only.

The graph is GO Biological Process from the embedded knowledge tables (the rule of
:class:`cellduality.metrics.baselines.GONeighbourBaseline`: two perturbations are neighbours when a
target of one shares a GO BP term with, or is, a target of the other), or a gene-gene edge list the user
gives (``--graph FILE``, e.g. STRING), read by :func:`read_edge_list` with the same rule on edges.

The answer format: ``add: A, B; remove: C`` (either clause may say ``none``), parsed by
:func:`parse_edit`. An empty final set predicts the mean of all training perturbations of the context
(the target excluded), the graph-neighbour baseline's own fallback.
"""

from __future__ import annotations

import gzip
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from cellduality.data.schema import DataError
from cellduality.metrics.baselines import GONeighbourBaseline, perturbation_targets
from cellduality.metrics.statistics import pearson, pearson_rows
from cellduality.parsing import normalize_label, parse_completion
from cellduality.tasks.common import (
    TaskConfig,
    example_rng,
    join_candidates,
    messages,
    opaque_id,
    pick,
    record,
)
from cellduality.tasks.templates import NEIGHBOURHOOD

if TYPE_CHECKING:
    from datasets import Dataset

    from cellduality.data.loading import CellData
    from cellduality.data.splits import Split

TASK = "neighbourhood"
#: Name of the side table of mean training deltas in ``PreparedTasks.tables``.
DELTA_TABLE = "neighbourhood_deltas"
GO_GRAPH_NAME = "GO Biological Process"
#: Greedy reference edit (train rows' ``answer``): at most this many moves, each improving r by this.
ORACLE_MAX_MOVES = 4
ORACLE_MIN_GAIN = 1e-3
NONE_WORDS = frozenset({"none", "nothing", "no", "-", "n/a", "na"})


# ----------------------------------------------------------------------------------------------------
# the knowledge graph


@dataclass
class EdgeList:
    """An undirected gene-gene graph: upper-cased symbol -> {neighbour symbol: edge weight}.

    ``weighted`` is False when the file had no weight column (every weight is then 1.0).
    """

    adjacency: dict[str, dict[str, float]]
    weighted: bool
    source: str
    n_edges: int

    def weight(self, a: str, b: str) -> float | None:
        return self.adjacency.get(a, {}).get(b)

    @property
    def name(self) -> str:
        return Path(self.source).name


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _split_line(line: str) -> list[str]:
    if "\t" in line:
        return [f.strip() for f in line.split("\t")]
    if "," in line:
        return [f.strip() for f in line.split(",")]
    return line.split()


_STRING_PROTEIN = re.compile(r"^\d+\.ENSP\d+")


def read_edge_list(path: str | Path, min_weight: float | None = None) -> EdgeList:
    """Read a gene-gene edge list: two gene columns, optionally a weight in the last column.

    Tab-, comma- or space-separated, optionally gzipped; lines starting with ``#`` are comments and a
    first line whose weight column is not a number (or that names columns) is a header. Genes are
    symbols, or Ensembl / Entrez gene IDs, mapped with the package's offline tables; matching is
    case-insensitive. Edges are undirected (a duplicate keeps its largest weight); self-loops are
    dropped; with ``min_weight``, lighter edges are dropped (e.g. STRING's ``combined_score`` >= 700).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"graph file {str(p)!r} does not exist")
    pairs: list[tuple[str, str, float | None]] = []
    with _open_text(p) as handle:
        first = True
        for raw in handle:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = _split_line(line)
            if len(fields) < 2:
                raise DataError(f"{p}: every line needs two gene columns, got {line[:80]!r}")
            weight = _number(fields[-1]) if len(fields) >= 3 else None
            if first:
                first = False
                header_words = {"gene", "genea", "geneb", "protein1", "protein2", "node1", "node2", "source"}
                names = {f.lower().replace("_", "").replace(" ", "") for f in fields[:2]}
                if (len(fields) >= 3 and weight is None) or names & header_words or "gene1" in names:
                    continue
            pairs.append((fields[0], fields[1], weight))
    if not pairs:
        raise DataError(f"graph file {p} holds no edge")
    with_weight = sum(w is not None for _, _, w in pairs)
    if 0 < with_weight < len(pairs):
        raise DataError(f"{p}: {len(pairs) - with_weight} of {len(pairs)} edges have no numeric weight")
    weighted = with_weight == len(pairs)
    names = list(dict.fromkeys(n for a, b, _ in pairs for n in (a, b)))
    if sum(bool(_STRING_PROTEIN.match(n)) for n in names[:2000]) > 0.5 * min(len(names), 2000):
        raise DataError(
            f"{p} names STRING proteins (9606.ENSP...), not genes: map them to gene symbols with STRING's "
            "protein.info file first (docs/recipes.md shows how)"
        )
    from cellduality.data.genes import detect_id_type, map_to_symbols

    id_type = detect_id_type(names)
    symbols = dict(zip(names, map_to_symbols(names, id_type), strict=True))
    adjacency: dict[str, dict[str, float]] = {}
    n_edges = 0
    for a, b, w in pairs:
        sa, sb = symbols.get(a), symbols.get(b)
        if not sa or not sb:
            continue
        sa, sb = sa.upper(), sb.upper()
        if sa == sb:
            continue
        value = 1.0 if w is None else float(w)
        if min_weight is not None and value < min_weight:
            continue
        old = adjacency.get(sa, {}).get(sb)
        if old is None:
            n_edges += 1
        if old is None or value > old:
            adjacency.setdefault(sa, {})[sb] = value
            adjacency.setdefault(sb, {})[sa] = value
    if not n_edges:
        raise DataError(f"{p}: no edge left between mappable genes (min_weight={min_weight})")
    return EdgeList(adjacency, weighted, str(p), n_edges)


class EdgeListNeighbourBaseline(GONeighbourBaseline):
    """The GO graph-neighbour baseline's rule and predictor on a user's gene-gene edge list.

    Two perturbations are neighbours when a target of one is adjacent to (or is) a target of the other;
    the neighbour's weight is the heaviest such edge (a shared target weighs ``inf``). ``fit`` and
    ``predict`` are :class:`GONeighbourBaseline`'s (mean delta of the neighbours, mean of all training
    perturbations without any).
    """

    def __init__(self, graph: EdgeList, control: str = "control", separator: str = "+") -> None:
        super().__init__(go={}, control=control, separator=separator)
        self.graph = graph

    def neighbour_weights(self, perturbation: str) -> dict[str, float]:
        targets = perturbation_targets(perturbation, self.separator, self.control)
        adjacent = [self.graph.adjacency.get(t, {}) for t in targets]
        found: dict[str, float] = {}
        for name in self.deltas_:
            if name == perturbation:
                continue
            other = perturbation_targets(name, self.separator, self.control)
            if other & targets:
                found[name] = math.inf
                continue
            weights = [adj[o] for adj in adjacent for o in other if o in adj]
            if weights:
                found[name] = max(weights)
        return found

    def neighbours(self, perturbation: str) -> list[str]:
        return list(self.neighbour_weights(perturbation))


def neighbour_baseline(graph: EdgeList | None, control: str) -> GONeighbourBaseline:
    """The graph-neighbour predictor of a graph (``None``: GO BP, the shipped annotations)."""
    return (
        GONeighbourBaseline(control=control) if graph is None else EdgeListNeighbourBaseline(graph, control)
    )


def neighbour_weights(baseline: GONeighbourBaseline, perturbation: str) -> dict[str, float | None]:
    """Neighbours of ``perturbation`` among the fitted training perturbations, with their weights."""
    if isinstance(baseline, EdgeListNeighbourBaseline):
        weights = baseline.neighbour_weights(perturbation)
        return dict(weights) if baseline.graph.weighted else dict.fromkeys(weights)
    return dict.fromkeys(baseline.neighbours(perturbation))


def cap_neighbours(
    weights: Mapping[str, float | None], cap: int, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """(shown, cut): at most ``cap`` neighbours, heaviest first (ties by name), or a seeded choice.

    ``shown`` is in prompt order (by weight, or by name when unweighted); ``cut`` holds the others in
    the order they would have come next.
    """
    names = sorted(weights)
    if any(w is not None for w in weights.values()):
        ordered = sorted(names, key=lambda n: (-(weights[n] or 0.0), n))
        return ordered[:cap], ordered[cap:]
    order = [names[i] for i in rng.permutation(len(names))]
    return sorted(order[:cap]), order[cap:]


# ----------------------------------------------------------------------------------------------------
# mean training deltas


@dataclass
class ContextDeltas:
    """The training perturbations of one (dataset, context) and their mean deltas (rows of ``matrix``)."""

    names: list[str]
    matrix: np.ndarray
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {n: i for i, n in enumerate(self.names)}
        self._total = self.matrix.sum(axis=0) if len(self.names) else np.zeros(self.matrix.shape[1])

    def delta(self, name: str) -> np.ndarray | None:
        i = self.index.get(name)
        return None if i is None else self.matrix[i]

    def mean_all(self, exclude: str | None = None) -> np.ndarray:
        """Mean delta of every training perturbation but ``exclude``: the empty neighbourhood's prediction."""
        i = self.index.get(exclude) if exclude is not None else None
        n = len(self.names) - (i is not None)
        if n <= 0:
            return np.zeros(self.matrix.shape[1])
        return (self._total - self.matrix[i]) / n if i is not None else self._total / n

    def mean_of(self, names: Iterable[str], exclude: str | None = None) -> np.ndarray:
        """Mean delta of ``names`` (unknown names and ``exclude`` skipped); :meth:`mean_all` when none is left."""
        idx = [self.index[n] for n in names if n in self.index and n != exclude]
        return self.matrix[idx].mean(axis=0) if idx else self.mean_all(exclude)


class DeltaTable:
    """Mean training deltas by (dataset, context): what the gain reward compares edits with."""

    def __init__(self, contexts: Mapping[tuple[str, str], ContextDeltas]) -> None:
        self.contexts = dict(contexts)

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> DeltaTable:
        grouped: dict[tuple[str, str], tuple[list[str], list[np.ndarray]]] = {}
        for row in rows:
            key = (str(row["dataset"]), str(row.get("context") or ""))
            names, vecs = grouped.setdefault(key, ([], []))
            names.append(str(row["perturbation"]))
            vecs.append(np.asarray(row["delta"], dtype=np.float64))
        return cls({k: ContextDeltas(n, np.vstack(v)) for k, (n, v) in grouped.items()})

    @classmethod
    def from_prepared(cls, prepared: Any) -> DeltaTable | None:
        """The table of a ``PreparedTasks`` (``None`` when it was prepared without the neighbourhood task)."""
        table = (getattr(prepared, "tables", None) or {}).get(DELTA_TABLE)
        if table is None or len(table) == 0:
            return None
        return cls.from_rows(table.with_format("numpy") if hasattr(table, "with_format") else table)

    def get(self, dataset: str, context: str) -> ContextDeltas | None:
        return self.contexts.get((str(dataset), str(context or "")))


# ----------------------------------------------------------------------------------------------------
# the answer: an edit


@dataclass(frozen=True)
class Edit:
    """What an answer proposes, as written (de-duplicated). ``well_formed``: only ``add:``/``remove:``
    clauses, each at most once."""

    additions: tuple[str, ...]
    removals: tuple[str, ...]
    well_formed: bool

    @property
    def empty(self) -> bool:
        return not self.additions and not self.removals


_CLAUSE = re.compile(r"\b(add|remove)\s*:", re.IGNORECASE)
_ITEM_SPLIT = re.compile(r"[\s,;]+")
_ITEM_STRIP = " \t\r\n.,;:!?\"'`*[](){}"


def parse_edit(completion: Any) -> Edit | None:
    """The edit a completion's ``<answer>`` proposes; ``None`` without an answer or an add/remove clause.

    Never raises. Items are separated by commas, semicolons or spaces; ``none`` means no item.
    """
    answer = parse_completion(completion).answer
    if not answer:
        return None
    matches = list(_CLAUSE.finditer(answer))
    if not matches:
        return None
    lead = answer[: matches[0].start()].strip(_ITEM_STRIP)
    kinds = [m.group(1).lower() for m in matches]
    items: dict[str, list[str]] = {"add": [], "remove": []}
    for m, nxt in zip(matches, [*matches[1:], None], strict=True):
        body = answer[m.end() : nxt.start() if nxt is not None else len(answer)]
        for token in _ITEM_SPLIT.split(body):
            word = token.strip(_ITEM_STRIP)
            if word and word.casefold() not in NONE_WORDS:
                items[m.group(1).lower()].append(word)

    def unique(words: list[str]) -> tuple[str, ...]:
        first: dict[str, str] = {}
        for word in words:
            first.setdefault(normalize_label(word), word)
        return tuple(first.values())

    return Edit(unique(items["add"]), unique(items["remove"]), not lead and len(set(kinds)) == len(kinds))


@dataclass(frozen=True)
class ResolvedEdit:
    """An edit checked against its row: what it validly adds and removes, and the final set."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    invalid: tuple[str, ...]
    final: tuple[str, ...]

    @property
    def n_proposed(self) -> int:
        return len(self.added) + len(self.removed) + len(self.invalid)

    @property
    def valid_fraction(self) -> float:
        return (len(self.added) + len(self.removed)) / self.n_proposed if self.n_proposed else math.nan


def resolve_edit(edit: Edit | None, neighbours: Sequence[str], candidates: Sequence[str]) -> ResolvedEdit:
    """Additions must be among ``candidates`` (training perturbations outside the neighbourhood),
    removals among ``neighbours``; other items are invalid and ignored. No edit keeps the neighbourhood."""
    neighbours = [str(n) for n in neighbours]
    if edit is None:
        return ResolvedEdit((), (), (), tuple(neighbours))
    can = {normalize_label(c): str(c) for c in candidates}
    nei = {normalize_label(n): n for n in neighbours}
    added = [can[normalize_label(a)] for a in edit.additions if normalize_label(a) in can]
    removed = [nei[normalize_label(r)] for r in edit.removals if normalize_label(r) in nei]
    invalid = [a for a in edit.additions if normalize_label(a) not in can]
    invalid += [r for r in edit.removals if normalize_label(r) not in nei]
    gone = set(removed)
    final = [n for n in neighbours if n not in gone] + added
    return ResolvedEdit(tuple(added), tuple(removed), tuple(invalid), tuple(final))


def format_edit(additions: Sequence[str], removals: Sequence[str]) -> str:
    """The canonical answer text: ``add: A, B; remove: none``."""
    return f"add: {join_candidates(additions) or 'none'}; remove: {join_candidates(removals) or 'none'}"


# ----------------------------------------------------------------------------------------------------
# the Pearson-delta gain


def edit_gain(
    final: Sequence[str],
    neighbours: Sequence[str],
    target: str,
    target_delta: np.ndarray,
    deltas: ContextDeltas,
) -> float:
    """Pearson delta of the edited set's mean delta minus the unedited neighbourhood's, on ``target_delta``.

    An empty set predicts the mean of all training perturbations but the target. ``nan`` correlations
    (a constant delta) count as 0.
    """
    r_edit = pearson(deltas.mean_of(final, exclude=target), target_delta)
    r_base = pearson(deltas.mean_of(neighbours, exclude=target), target_delta)
    r_edit = 0.0 if not math.isfinite(r_edit) else r_edit
    r_base = 0.0 if not math.isfinite(r_base) else r_base
    return r_edit - r_base


def greedy_edit(
    neighbours: Sequence[str],
    candidates: Sequence[str],
    target: str,
    target_delta: np.ndarray,
    deltas: ContextDeltas,
    max_moves: int = ORACLE_MAX_MOVES,
    min_gain: float = ORACLE_MIN_GAIN,
) -> tuple[list[str], list[str]]:
    """A reference edit: greedily add a candidate or remove a neighbour while it raises the Pearson delta.

    Uses the target's *training* delta, so it is a label for training rows only (their ``answer``).
    Each step scores every move at once from the running sum of the current set's deltas.
    """
    current = [n for n in dict.fromkeys(neighbours) if deltas.delta(n) is not None and n != target]
    pool = [c for c in dict.fromkeys(candidates) if deltas.delta(c) is not None and c != target]
    truth = np.asarray(target_delta, dtype=float)
    fallback = deltas.mean_all(exclude=target)
    total = np.sum([deltas.delta(n) for n in current], axis=0) if current else np.zeros_like(fallback)
    score = pearson(total / len(current) if current else fallback, truth)
    score = score if math.isfinite(score) else 0.0
    added: list[str] = []
    removed: list[str] = []
    for _ in range(max_moves):
        removable = [n for n in current if n not in added]
        addable = [c for c in pool if c not in current]
        if not removable and not addable:
            break
        k = len(current)
        means = []
        if removable:
            rem = deltas.matrix[[deltas.index[n] for n in removable]]
            means.append((total - rem) / (k - 1) if k > 1 else np.tile(fallback, (len(removable), 1)))
        if addable:
            means.append((total + deltas.matrix[[deltas.index[c] for c in addable]]) / (k + 1))
        r = pearson_rows(np.vstack(means), truth[None, :])[:, 0]
        r = np.where(np.isfinite(r), r, 0.0)
        best = int(np.argmax(r))
        if r[best] - score < min_gain:
            break
        score = float(r[best])
        if best < len(removable):
            name = removable[best]
            current.remove(name)
            removed.append(name)
            total = total - deltas.delta(name)
        else:
            name = addable[best - len(removable)]
            current.append(name)
            added.append(name)
            total = total + deltas.delta(name)
    return sorted(added), sorted(removed)


# ----------------------------------------------------------------------------------------------------
# building the examples


@dataclass
class NeighbourhoodExamples:
    """Rows per split and the table of mean training deltas."""

    rows: dict[str, list[dict[str, Any]]]
    table: list[dict[str, Any]]
    graph: str
    notes: list[str] = field(default_factory=list)


def neighbours_text(names: Sequence[str]) -> str:
    if names:
        return join_candidates(names)
    return "none (without neighbours the prediction is the mean of all training perturbations)"


def neighbourhood_examples(data: CellData, split: Split, cfg: TaskConfig) -> NeighbourhoodExamples:
    """Examples of the neighbourhood task for both splits of an OOD split, and the training deltas."""
    from cellduality.tasks.classification import context_text
    from cellduality.tasks.generative import _context_keys

    columns = data.columns
    if split.mode != "ood":
        raise DataError(
            "task 'neighbourhood' predicts held-out perturbations from the training ones: prepare it with "
            "--split ood"
        )
    graph = read_edge_list(cfg.graph, cfg.graph_min_weight) if cfg.graph else None
    graph_name = graph.name if graph is not None else GO_GRAPH_NAME
    obs = data.adata.obs
    x = sp.csr_matrix(data.adata.X, dtype=np.float32)
    control = str(columns.control_value)
    conditions = obs[columns.perturbation].astype(str).to_numpy()
    is_control = conditions == control
    contexts = _context_keys(obs, columns)
    in_train = np.zeros(len(obs), dtype=bool)
    in_train[split.train] = True
    in_test = np.zeros(len(obs), dtype=bool)
    in_test[split.test] = True
    if not (is_control & in_train).any():
        raise DataError(f"the training split has no control cell ({columns.perturbation} == {control!r})")
    rows: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    table: list[dict[str, Any]] = []
    notes: list[str] = []
    for ctx in sorted(set(contexts.tolist()), key=str):
        here = contexts == ctx
        first = int(np.flatnonzero(here)[0])
        ctx_text = context_text(obs.iloc[first], columns.context)
        perturbed = np.flatnonzero(here & in_train & ~is_control)
        if perturbed.size == 0:
            notes.append(f"neighbourhood: no training perturbation in context {ctx_text!r}: skipped")
            continue
        controls = np.flatnonzero(here & in_train & is_control)
        if controls.size == 0:
            controls = np.flatnonzero(in_train & is_control)
            notes.append(
                f"neighbourhood: no training control in context {ctx_text!r}: all training controls used"
            )
        cells = np.concatenate([perturbed, controls])
        baseline = neighbour_baseline(graph, control).fit(x[cells], conditions[cells].tolist())
        names = sorted(baseline.deltas_)
        counts = dict(zip(*np.unique(conditions[perturbed], return_counts=True), strict=True))
        for name in names:
            table.append(
                {
                    "dataset": data.name,
                    "context": ctx_text,
                    "perturbation": name,
                    "n_cells": int(counts.get(name, 0)),
                    "delta": np.asarray(baseline.deltas_[name], dtype=np.float32),
                }
            )
        deltas = ContextDeltas(names, np.vstack([baseline.deltas_[n] for n in names]).astype(np.float64))
        targets = {
            "train": names,
            "test": sorted(set(conditions[here & in_test & ~is_control].tolist())),
        }
        first_cell: dict[str, int] = {}  # where the direction (CRISPRi / CRISPRa) of a target is read
        for i in np.flatnonzero(here & ~is_control):
            first_cell.setdefault(str(conditions[i]), int(i))
        for split_name, split_targets in targets.items():
            for target in split_targets:
                rows[split_name].append(
                    _row(
                        data,
                        cfg,
                        baseline,
                        deltas,
                        target,
                        ctx_text,
                        split_name,
                        graph_name,
                        first_cell[target],
                    )
                )
    return NeighbourhoodExamples(rows, table, graph_name, notes)


def _row(
    data: CellData,
    cfg: TaskConfig,
    baseline: GONeighbourBaseline,
    deltas: ContextDeltas,
    target: str,
    ctx_text: str,
    split_name: str,
    graph_name: str,
    cell: int,
) -> dict[str, Any]:
    from cellduality.tasks.generative import perturbation_text

    columns = data.columns
    obs = data.adata.obs
    rng = example_rng(cfg.seed, f"{TASK}/{data.name}/{ctx_text}/{target}")
    weights = neighbour_weights(baseline, target)
    shown, cut = cap_neighbours(weights, max(0, cfg.max_neighbours), rng)
    # what may be added: the other training perturbations; neighbours cut by the cap first, then seeded
    shown_set, cut_set = set(shown), set(cut)
    pool = [n for n in deltas.names if n != target and n not in shown_set]
    pool_set = set(pool)
    rest = [n for n in pool if n not in cut_set]
    ordered = [n for n in cut if n in pool_set] + [rest[i] for i in rng.permutation(len(rest))]
    limit = cfg.max_additions if cfg.max_additions and cfg.max_additions > 0 else len(ordered)
    candidates = sorted(ordered[:limit])
    direction = str(obs.iloc[cell][columns.direction]) if columns.direction else None
    text = perturbation_text(target, columns, direction, None)
    prompt = pick(rng, NEIGHBOURHOOD).format(
        condition_text=text,
        context=f" ({ctx_text})" if ctx_text else "",
        graph=graph_name,
        neighbours=neighbours_text(shown),
        candidates=join_candidates(candidates) or "none",
    )
    answer = ""
    own = deltas.delta(target)
    if split_name == "train" and own is not None:
        answer = format_edit(*greedy_edit(shown, candidates, target, own, deltas))
    return record(
        id=opaque_id(cfg.seed, data.name, TASK, split_name, f"{target}@{ctx_text}"),
        task=TASK,
        prompt=messages(prompt),
        answer=answer,
        candidates=candidates,
        condition=target,
        condition_text=text,
        context=ctx_text,
        dataset=data.name,
        neighbours=list(shown),
    )


def delta_table(rows: list[dict[str, Any]]) -> Dataset:
    """The side table as a ``datasets.Dataset`` (float32 deltas)."""
    from datasets import Dataset, Features, Value
    from datasets import Sequence as HFSequence

    features = Features(
        {
            "dataset": Value("string"),
            "context": Value("string"),
            "perturbation": Value("string"),
            "n_cells": Value("int32"),
            "delta": HFSequence(Value("float32")),
        }
    )
    if not rows:
        return Dataset.from_dict({k: [] for k in features}, features=features)
    return Dataset.from_list(rows, features=features)


__all__ = [
    "DELTA_TABLE",
    "TASK",
    "ContextDeltas",
    "DeltaTable",
    "EdgeList",
    "EdgeListNeighbourBaseline",
    "Edit",
    "NeighbourhoodExamples",
    "ResolvedEdit",
    "cap_neighbours",
    "delta_table",
    "edit_gain",
    "format_edit",
    "greedy_edit",
    "neighbour_baseline",
    "neighbourhood_examples",
    "parse_edit",
    "read_edge_list",
    "resolve_edit",
]
