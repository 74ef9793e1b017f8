"""``cellduality dual-check``: does the dual reward tell a right forward answer from a wrong one?

GRPO learns only from reward *differences* between completions of the same prompt. A dual reward that
scores a right and a wrong forward answer alike teaches nothing, whatever its training curve does. This
check validates the reward the way verifiers validates a reward on gold answers, extended to known-bad
answers, with the policy that would be trained (a checkpoint) answering the dual prompts:

1. **Counterfactual gap.** For each example, the dual reward of a *right* forward answer (the true label;
   a real cell of the prompted condition) and of a *wrong* one (another candidate label; a real cell of
   another condition; for perturbation also the unchanged control cell). Reported: mean reward of each,
   the gap, the share of rows where right is strictly better / tied / worse, and a bootstrap 95% interval
   of the mean paired gap (``scipy.stats.bootstrap``).
2. **What GRPO sees.** ``G`` sampled forward completions per prompt, each scored by the dual reward
   (exactly :class:`cellduality.rewards.dual.DualReward`, fed no label column) and by the oracle reward:
   the share of groups whose dual reward has zero variance (no gradient), the mean within-group Spearman
   correlation of dual and oracle rewards, and the mean dual reward of the better vs the worse answers
   inside mixed groups (correct vs incorrect for classification; above vs below the group's median
   oracle RWJS for generation).

Labels are read here, by the check, never by a reward: the dual reward receives the same columns as in
a self-supervised GRPO run (no ``answer``, no ``cell_id``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellduality.parsing import gene_vocabulary
from cellduality.rewards import RewardContext, build_rewards
from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS, control_cell_genes, has_dual

Messages = list[dict[str, str]]
Row = dict[str, Any]
GenerateFn = Callable[[list[Messages]], list[str]]

#: columns a self-supervised GRPO run hands its rewards (the trainer never receives the others)
LABEL_FREE_DROP = ("answer", "cell_id")
#: below this lower bound of the gap's 95% interval a dual "carries no signal"
MIN_GAP = 0.0


@dataclass
class DualCheckConfig:
    """Sizes of the check. ``max_rows`` per task and split (seeded sample); ``group_size`` = GRPO's G."""

    splits: Sequence[str] = ("test",)
    tasks: Sequence[str] | None = None
    max_rows: int = 60
    group_size: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    batch_size: int = 32
    n_resamples: int = 2000
    seed: int = 0
    grpo_view: bool = True
    reference: bool = True


@dataclass
class Gap:
    """Right vs one kind of wrong forward answer, paired by example."""

    wrong_kind: str
    n: int
    right: float
    wrong: float
    gap: float
    ci_low: float
    ci_high: float
    better: float
    tied: float
    worse: float


@dataclass
class GroupView:
    """What GRPO's advantage sees over ``groups`` sampled groups of one task."""

    groups: int
    parsed: float
    zero_variance: float
    spearman: float | None
    mixed_groups: int
    dual_of_better: float | None
    dual_of_worse: float | None


@dataclass
class TaskCheck:
    dataset: str
    task: str
    split: str
    gaps: list[Gap] = field(default_factory=list)
    grpo: GroupView | None = None
    verdict: str = ""
    #: the same right vs wrong answers scored by a reader fitted on the training labels
    #: (:mod:`cellduality.eval.dual_bound`): what the data allow any policy's dual to see
    reference: list[Gap] = field(default_factory=list)

    @property
    def carries_signal(self) -> bool:
        return self.verdict == "carries signal"


def _completion(answer: str) -> str:
    return f"<think>counterfactual</think><answer>{answer}</answer>"


def _label_free(rows: Sequence[Row]) -> dict[str, list[Any]]:
    """TRL-style column lists of ``rows`` without the columns a self-supervised trainer never gets."""
    keys = [k for k in rows[0] if k not in LABEL_FREE_DROP] if rows else []
    return {k: [r[k] for r in rows] for k in keys}


def counterfactuals(rows: Sequence[Row], seed: int) -> dict[str, list[str | None]]:
    """Per row: the right forward answer and each kind of wrong one (``None`` where none exists).

    Classification: the true label vs another candidate. Generation: the row's real cell vs a real cell
    of another condition (same dataset and split). Perturbation: a real cell of another perturbation or
    another real control cell of the same context, and the unchanged paired control cell (its first
    ``n_genes`` genes).
    """
    rng = np.random.default_rng(seed)
    right: list[str | None] = []
    wrong: list[str | None] = []
    control: list[str | None] = []
    by_condition: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        by_condition.setdefault((str(r["dataset"]), str(r.get("condition", ""))), []).append(i)
    # each row's paired control cell, once (every perturbation row compares against all of them)
    controls = [control_cell_genes(r) if r["task"] == "perturbation" else [] for r in rows]
    for r, own_control in zip(rows, controls, strict=True):
        right.append(str(r["answer"]))
        if r["task"] in CLASSIFICATION_TASKS:
            others = [c for c in r["candidates"] if c != r["answer"]]
            wrong.append(str(others[int(rng.integers(len(others)))]) if others else None)
            control.append(None)
            continue
        pool = [
            j
            for (ds, cond), idx in by_condition.items()
            if ds == r["dataset"] and cond != r["condition"]
            for j in idx
            if rows[j].get("context", "") == r.get("context", "") or r["task"] != "perturbation"
        ]
        cells = [str(rows[j]["answer"]) for j in pool]
        if r["task"] == "perturbation":
            # the control value is a condition too: real control cells of the context, not the paired one
            cells += sorted(
                {
                    " ".join(genes)
                    for o, genes in zip(rows, controls, strict=True)
                    if o["task"] == "perturbation"
                    and o.get("context", "") == r.get("context", "")
                    and genes != own_control
                }
            )
            control.append(" ".join(own_control))
        else:
            control.append(None)
        wrong.append(cells[int(rng.integers(len(cells)))] if cells else None)
    out = {
        "right": right,
        "other condition" if rows and rows[0]["task"] in GENERATION_TASKS else "other label": wrong,
    }
    if rows and rows[0]["task"] == "perturbation":
        out["control cell"] = control
    # a kind of wrong answer that no row has (one perturbation only: no cell of another one) is not compared
    return {k: v for k, v in out.items() if k == "right" or any(a is not None for a in v)}


def paired_gap(right: np.ndarray, wrong: np.ndarray, kind: str, n_resamples: int, seed: int) -> Gap:
    """Mean paired gap with a percentile bootstrap 95% interval (degenerate data: the point itself)."""
    from scipy.stats import bootstrap

    diff = right - wrong
    n = int(diff.size)
    if n == 0:
        nan = float("nan")
        return Gap(kind, 0, nan, nan, nan, nan, nan, nan, nan, nan)
    mean = float(diff.mean())
    if n < 2 or np.allclose(diff, diff[0]):
        low = high = mean
    else:
        res = bootstrap(
            (diff,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=0.95,
            method="percentile",
            random_state=np.random.default_rng(seed),
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    eps = 1e-12
    return Gap(
        wrong_kind=kind,
        n=n,
        right=float(right.mean()),
        wrong=float(wrong.mean()),
        gap=mean,
        ci_low=low,
        ci_high=high,
        better=float((diff > eps).mean()),
        tied=float((np.abs(diff) <= eps).mean()),
        worse=float((diff < -eps).mean()),
    )


def group_view(dual: np.ndarray, oracle: np.ndarray, parsed: np.ndarray, task: str) -> GroupView:
    """Statistics of ``groups x G`` dual and oracle rewards, as GRPO's group advantage sees them."""
    from scipy.stats import spearmanr

    zero_var = np.ptp(dual, axis=1) <= 1e-12
    rhos = []
    better: list[float] = []
    worse: list[float] = []
    mixed = 0
    for d, o in zip(dual, oracle, strict=True):
        if np.ptp(d) > 1e-12 and np.ptp(o) > 1e-12:
            rhos.append(float(spearmanr(d, o).statistic))
        if task in CLASSIFICATION_TASKS:
            hi, lo = o >= 0.5, o < 0.5
        else:
            med = float(np.median(o))
            hi, lo = o > med, o < med
        if hi.any() and lo.any():
            mixed += 1
            better.append(float(d[hi].mean()))
            worse.append(float(d[lo].mean()))
    return GroupView(
        groups=int(dual.shape[0]),
        parsed=float(parsed.mean()) if parsed.size else float("nan"),
        zero_variance=float(zero_var.mean()) if zero_var.size else float("nan"),
        spearman=float(np.mean(rhos)) if rhos else None,
        mixed_groups=mixed,
        dual_of_better=float(np.mean(better)) if better else None,
        dual_of_worse=float(np.mean(worse)) if worse else None,
    )


def verdict(check: TaskCheck) -> str:
    """ "carries signal" when every right-vs-wrong gap's 95% interval lies above 0, else the reason."""
    reasons = []
    for g in check.gaps:
        if g.n == 0:
            reasons.append(f"no {g.wrong_kind} to compare with")
        elif not g.ci_low > MIN_GAP:
            if g.right == 0 and g.wrong == 0:
                reasons.append(f"the dual reward is 0 for right and {g.wrong_kind} answers alike")
            elif g.tied >= 0.5:
                reasons.append(f"right and {g.wrong_kind} answers tie in {g.tied:.0%} of rows")
            else:
                reasons.append(
                    f"right minus {g.wrong_kind} = {g.gap:+.3f}, 95% CI [{g.ci_low:+.3f}, {g.ci_high:+.3f}]"
                )
    if not reasons:
        return "carries signal"
    return "no signal: " + "; ".join(reasons) + _reference_reason(check)


def _reference_reason(check: TaskCheck) -> str:
    """Whether the data or the policy is at fault, from the reference reader's gaps (when measured)."""
    if not check.reference:
        return ""
    blind = [g for g in check.reference if g.n and not g.ci_low > MIN_GAP]
    if blind:
        g = blind[0]
        return (
            f" (the data do not allow it: a reader fitted on the training labels scores right {g.right:.3f} "
            f"vs {g.wrong_kind} {g.wrong:.3f})"
        )
    g = min(check.reference, key=lambda g: g.gap)
    return f" (the data allow it: a reader fitted on the training labels gets a gap of {g.gap:+.3f}; the policy has not learned to read the answer)"


def _gaps(scored: Mapping[str, np.ndarray], config: DualCheckConfig) -> list[Gap]:
    """Right vs each kind of wrong answer, over the rows where both were scored (NaN: not asked)."""
    out = []
    for kind, values in scored.items():
        if kind != "right":
            ok = ~np.isnan(values) & ~np.isnan(scored["right"])
            out.append(paired_gap(scored["right"][ok], values[ok], kind, config.n_resamples, config.seed))
    return out


def check_task(
    rows: Sequence[Row],
    generate: GenerateFn,
    sample: GenerateFn | None,
    config: DualCheckConfig,
    genes: Sequence[str],
    reference: Any = None,
) -> TaskCheck:
    """Both parts of the check for the rows of one task, dataset and split.

    ``reference``: a :class:`cellduality.eval.dual_bound.ReferenceReader`; with it, the right vs wrong
    gaps are also measured for a reader fitted on the training labels (the data's own bound).
    """
    first = rows[0]
    result = TaskCheck(str(first["dataset"]), str(first["task"]), str(first.get("_split", "")))
    vocab = gene_vocabulary(genes)
    # the rewards built as training builds them (the registry's one factory signature, from a context):
    # the check validates the reward a recipe names, not a copy wired by hand
    context = RewardContext(vocabulary=vocab, generate=generate, seed=config.seed)
    reward, oracle_reward = build_rewards(
        ["dual", "oracle"], context, params={"dual": {"deterministic": True}}
    )
    columns = _label_free(rows)
    answers = counterfactuals(rows, config.seed)
    scored: dict[str, np.ndarray] = {}
    for kind, values in answers.items():
        keep = [i for i, v in enumerate(values) if v is not None]
        sub = {k: [v[i] for i in keep] for k, v in columns.items()}
        scores = reward(completions=[_completion(str(values[i])) for i in keep], **sub)
        full = np.full(len(rows), np.nan)
        full[keep] = np.asarray(scores, dtype=float)
        scored[kind] = full
    result.gaps = _gaps(scored, config)
    if reference is not None:
        ref = {
            kind: np.asarray([reference.score(r, v) for r, v in zip(rows, values, strict=True)], dtype=float)
            for kind, values in answers.items()
        }
        result.reference = _gaps(ref, config)
    if config.grpo_view and sample is not None and config.group_size > 1:
        g = config.group_size
        prompts = [list(r["prompt"]) for r in rows for _ in range(g)]
        completions = sample(prompts)
        expanded = {k: [v for v in values for _ in range(g)] for k, values in columns.items()}
        dual = np.asarray(reward(completions=completions, **expanded), dtype=float).reshape(len(rows), g)
        parsed = np.asarray(
            [d["index"] for d in reward.last_details], dtype=int
        )  # indices of completions that got a dual prompt
        parsed_mask = np.zeros(len(completions), dtype=bool)
        parsed_mask[parsed] = True
        with_labels = {
            k: [r[k] for r in rows for _ in range(g)] for k in ("task", "answer", "candidates", "n_genes")
        }
        oracle = np.asarray(oracle_reward(completions=completions, **with_labels), dtype=float)
        result.grpo = group_view(dual, oracle.reshape(len(rows), g), parsed_mask, result.task)
    result.verdict = verdict(result)
    return result


def _rows_of(
    prepared: Any, split: str, tasks: Sequence[str] | None, limit: int, seed: int
) -> dict[str, list[Row]]:
    ds = prepared.datasets[split]
    task_col = np.asarray(ds["task"])
    out: dict[str, list[Row]] = {}
    for task in dict.fromkeys(task_col.tolist()):
        if (tasks and task not in tasks) or not has_dual(task):  # neighbourhood editing has no dual
            continue
        idx = np.flatnonzero(task_col == task)
        if limit and idx.size > limit:
            rng = np.random.default_rng([seed, len(task)])
            idx = np.sort(rng.choice(idx, size=limit, replace=False))
        rows = [dict(ds[int(i)]) for i in idx]
        for r in rows:
            r["_split"] = split
        out[task] = rows
    return out


def run_dual_check(
    model: str,
    prepared_dirs: Sequence[str | Path],
    config: DualCheckConfig | None = None,
    out_dir: str | Path | None = None,
    backend: str = "hf",
    progress: bool = True,
) -> list[TaskCheck]:
    """The check for one checkpoint over prepared folders; writes ``dual_check.json`` / ``.md`` to ``out_dir``."""
    from tqdm.auto import tqdm

    from cellduality.inference.generate import GenerationSettings, ModelSpec, load_backend
    from cellduality.tasks import load_prepared

    cfg = config or DualCheckConfig()
    greedy = GenerationSettings(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed)
    sampled = GenerationSettings(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    engine = load_backend(ModelSpec(str(model)), greedy, backend)

    def batched(settings: GenerationSettings) -> GenerateFn:
        def run(prompts: list[Messages]) -> list[str]:
            out: list[str] = []
            for start in range(0, len(prompts), cfg.batch_size):
                out.extend(engine.generate(prompts[start : start + cfg.batch_size], settings))
            return out

        return run

    generate, sample = batched(greedy), batched(sampled)
    from cellduality.eval.dual_bound import ReferenceReader

    jobs = []
    for folder in prepared_dirs:
        prepared = load_prepared(folder)
        reader = ReferenceReader(prepared, cfg.seed) if cfg.reference else None
        for split in cfg.splits:
            if split not in prepared.datasets:
                continue
            for rows in _rows_of(prepared, split, cfg.tasks, cfg.max_rows, cfg.seed).values():
                jobs.append((rows, prepared.genes, reader))
    checks = []
    for rows, genes, reader in tqdm(jobs, desc="dual-check", unit="task", disable=not progress):
        checks.append(check_task(rows, generate, sample, cfg, genes, reader))
    if out_dir is not None:
        write_dual_check(checks, out_dir, model=str(model), config=cfg)
    return checks


def _f(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def markdown_table(checks: Sequence[TaskCheck], title: str | None = None) -> list[str]:
    """The check as Markdown: one line per task and kind of wrong answer, then the GRPO view."""
    lines = [f"### {title}", ""] if title else []
    lines += [
        "| dataset | task | split | wrong answer | rows | dual reward, right | wrong | gap (95% CI) | right better / tied / worse | data bound: right / wrong (gap) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        refs = {g.wrong_kind: g for g in c.reference}
        for g in c.gaps:
            r = refs.get(g.wrong_kind)
            bound = f"{_f(r.right)} / {_f(r.wrong)} ({_f(r.gap, True)})" if r is not None else "—"
            lines.append(
                f"| {c.dataset} | {c.task} | {c.split} | {g.wrong_kind} | {g.n} | {_f(g.right)} | {_f(g.wrong)} | "
                f"{_f(g.gap, True)} [{_f(g.ci_low, True)}, {_f(g.ci_high, True)}] | "
                f"{_f(g.better)} / {_f(g.tied)} / {_f(g.worse)} | {bound} |"
            )
    if any(c.grpo for c in checks):
        lines += [
            "",
            "| dataset | task | groups | answers parsed | zero-variance groups | Spearman(dual, oracle) | mixed groups | dual of better / worse answers |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            if c.grpo is None:
                continue
            v = c.grpo
            lines.append(
                f"| {c.dataset} | {c.task} | {v.groups} | {_f(v.parsed)} | {_f(v.zero_variance)} | "
                f"{_f(v.spearman, True)} | {v.mixed_groups} | {_f(v.dual_of_better)} / {_f(v.dual_of_worse)} |"
            )
    lines += ["", "| dataset | task | verdict |", "|---|---|---|"]
    lines += [f"| {c.dataset} | {c.task} | {c.verdict} |" for c in checks]
    return lines


def to_json(checks: Sequence[TaskCheck]) -> list[dict[str, Any]]:
    return [{**asdict(c), "carries_signal": c.carries_signal} for c in checks]


def from_json(items: Sequence[dict[str, Any]]) -> list[TaskCheck]:
    """``TaskCheck`` objects back from :func:`to_json` dicts (for reports built from saved runs)."""
    out = []
    for item in items:
        grpo = item.get("grpo")
        out.append(
            TaskCheck(
                dataset=item["dataset"],
                task=item["task"],
                split=item["split"],
                gaps=[Gap(**g) for g in item["gaps"]],
                grpo=GroupView(**grpo) if grpo else None,
                verdict=item["verdict"],
                reference=[Gap(**g) for g in item.get("reference") or []],
            )
        )
    return out


def write_dual_check(
    checks: Sequence[TaskCheck], out_dir: str | Path, *, model: str, config: DualCheckConfig
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, "config": asdict(config), "checks": to_json(checks)}
    (out / "dual_check.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    md = [
        "# Dual check",
        "",
        f"Model `{model}`. For each example the dual reward of a right and of a wrong forward answer "
        "(the policy answers the dual prompt greedily); then G sampled forward answers per prompt, as "
        f"GRPO sees them (G = {config.group_size}, temperature {config.temperature}). Labels are read by "
        "this check only. *Data bound*: the same answers scored by a reader fitted on the training "
        "labels (a logistic regression on sentence genes for naming a condition; the label's training "
        "profile for in-painting), what the data allow any policy's dual to see.",
        "",
        *markdown_table(checks),
    ]
    (out / "dual_check.md").write_text("\n".join(md) + "\n")
    return out


def load_dual_check(path: str | Path) -> list[dict[str, Any]]:
    """The checks of a ``dual_check.json`` (as dicts)."""
    return json.loads(Path(path).read_text())["checks"]
