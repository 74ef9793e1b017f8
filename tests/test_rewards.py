"""Rewards with TRL's signature: format, oracle, dual (with a policy stand-in), registry."""

from __future__ import annotations

import numpy as np
import pytest

from cellduality.parsing import gene_vocabulary
from cellduality.rewards import REWARDS, USES_LABELS, DualReward, RewardContext, build_rewards
from cellduality.tasks import TaskConfig, build_tasks


@pytest.fixture(scope="module")
def rows(pbmc):
    ds = build_tasks(pbmc, config=TaskConfig(top_k=12, max_examples=6)).datasets["train"]
    return [dict(r) for r in ds]


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


def _c(text: str):
    return [{"role": "assistant", "content": text}]


def test_format_reward() -> None:
    (fmt,) = build_rewards(["format"], RewardContext())
    assert fmt(prompts=[None, None], completions=[_c("<think>a</think><answer>b</answer>"), _c("b")]) == [
        1.0,
        0.0,
    ]
    assert fmt.__name__ == "format"


def test_oracle_rewards(rows) -> None:
    ann = next(r for r in rows if r["task"] == "annotation")
    gen = next(r for r in rows if r["task"] == "generation")
    wrong = next(c for c in ann["candidates"] if c != ann["answer"])
    batch = [ann, ann, gen, gen]
    completions = [
        _c(f"<think>t</think><answer>{ann['answer']}</answer>"),
        _c(f"<think>t</think><answer>{wrong}</answer>"),
        _c(f"<think>t</think><answer>{gen['answer']}</answer>"),
        _c("<think>t</think><answer>" + " ".join(reversed(gen["answer"].split())) + "</answer>"),
    ]
    acc, rw, both = build_rewards(
        ["oracle_accuracy", "oracle_rwjs", "oracle"],
        RewardContext(vocabulary=gene_vocabulary(gen["answer"].split())),
    )
    assert acc(prompts=None, completions=completions, **_columns(batch)) == [1.0, 0.0, None, None]
    r = rw(prompts=None, completions=completions, **_columns(batch))
    assert r[:2] == [None, None] and r[2] == pytest.approx(1.0) and 0 < r[3] < 1
    assert both(prompts=None, completions=completions, **_columns(batch))[:3] == [
        1.0,
        0.0,
        pytest.approx(1.0),
    ]


def test_dual_reward_one_generation_call_and_scores(rows) -> None:
    calls: list[int] = []
    ann = next(r for r in rows if r["task"] == "annotation")
    gen = next(r for r in rows if r["task"] == "generation")

    def policy(prompts):
        # a policy that in-paints perfectly and names the prompted cell type
        calls.append(len(prompts))
        out = []
        for p in prompts:
            text = p[-1]["content"]
            if "hidden" in text or "missing" in text:
                out.append("<think>.</think><answer>" + " ".join(ann["hidden_genes"]) + "</answer>")
            else:
                out.append(f"<think>.</think><answer>{gen['condition']}</answer>")
        return out

    dual = DualReward(generate=policy, num_samples=2)
    completions = [
        _c(f"<think>t</think><answer>{ann['answer']}</answer>"),
        _c("no answer"),
        _c(f"<think>t</think><answer>{gen['answer']}</answer>"),
    ]
    scores = dual(prompts=None, completions=completions, **_columns([ann, ann, gen]))
    assert calls == [4]  # 2 parsed forward answers x 2 dual samples, one call
    assert scores == [pytest.approx(1.0), 0.0, 1.0]
    assert len(dual.last_details) == 4
    # nothing parses: generate is still called exactly once (rank symmetry), with no prompt
    calls.clear()
    assert dual(prompts=None, completions=[_c("x")], **_columns([ann])) == [0.0]
    assert calls == [0]


def test_dual_reward_never_reads_answer(rows) -> None:
    gen = next(r for r in rows if r["task"] == "generation")
    dual = DualReward(generate=lambda ps: [f"<answer>{gen['condition']}</answer>" for _ in ps])
    forged = {**gen, "answer": "SOMETHING ELSE ENTIRELY"}
    completion = [_c(f"<think>t</think><answer>{gen['answer']}</answer>")]
    assert dual(prompts=None, completions=completion, **_columns([gen])) == dual(
        prompts=None, completions=completion, **_columns([forged])
    )


def test_dual_readers_route_by_task_and_are_each_called_once(rows) -> None:
    """``DualReward.readers``: a task's duals go to its own reader; every reader is called once per reward
    call, with an empty list when it has nothing to answer (ranks stay in step), and scores follow the
    reader that answered."""
    ann = next(r for r in rows if r["task"] == "annotation")
    gen = next(r for r in rows if r["task"] == "generation")
    calls: list[tuple[str, int]] = []

    def reader(name: str, answer: str):
        def generate(prompts):
            calls.append((name, len(prompts)))
            return [answer for _ in prompts]

        return generate

    perfect_inpainting = "<think>.</think><answer>" + " ".join(ann["hidden_genes"]) + "</answer>"
    frozen = reader("frozen", perfect_inpainting)
    dual = DualReward(generate=reader("policy", f"<answer>{gen['condition']}</answer>"))
    dual.readers = {"annotation": frozen, "drug_sensitivity": frozen}
    completions = [
        _c(f"<think>t</think><answer>{ann['answer']}</answer>"),
        _c(f"<think>t</think><answer>{gen['answer']}</answer>"),
    ]
    scores = dual(prompts=None, completions=completions, **_columns([ann, gen]))
    assert calls == [("policy", 1), ("frozen", 1)]
    assert scores == [pytest.approx(1.0), 1.0]
    calls.clear()
    assert dual(prompts=None, completions=completions[1:], **_columns([gen])) == [1.0]
    assert calls == [("policy", 1), ("frozen", 0)]
    assert dual.history[-1]["generated"] == 1


def test_registry() -> None:
    assert {"format", "dual", "oracle", "oracle_accuracy", "oracle_rwjs"} <= set(REWARDS)
    assert "dual" not in USES_LABELS and "format" not in USES_LABELS
    with pytest.raises(KeyError, match="registered rewards"):
        build_rewards(["nope"], RewardContext())
    with pytest.raises(RuntimeError, match="needs the policy"):
        build_rewards(["dual"], RewardContext())[0](prompts=None, completions=[_c("x")], task=["annotation"])


def test_dual_reward_deterministic_generates_each_prompt_once(rows) -> None:
    ann = next(r for r in rows if r["task"] == "annotation")
    seen: list[int] = []

    def policy(prompts):
        seen.append(len(prompts))
        return ["<think>.</think><answer>" + " ".join(ann["hidden_genes"]) + "</answer>" for _ in prompts]

    same = _c(f"<think>t</think><answer>{ann['answer']}</answer>")
    other = next(c for c in ann["candidates"] if c != ann["answer"])
    completions = [same, same, same, _c(f"<think>t</think><answer>{other}</answer>")]
    dual = DualReward(generate=policy, deterministic=True)
    scores = dual(prompts=None, completions=completions, **_columns([ann] * 4))
    assert seen == [2]  # two distinct forward answers -> two dual prompts, one call
    assert scores[:3] == [pytest.approx(1.0)] * 3
    assert dual.history[-1] == {"tasks": ["annotation"], "prompts": 4, "generated": 2}


def test_dual_reward_logs_per_task_and_dual_completions(rows) -> None:
    """What TRL shows: per-task dual metrics (log_metric) and a dual_completion column (log_extra)."""
    ann = next(r for r in rows if r["task"] == "annotation")
    gen = next(r for r in rows if r["task"] == "generation")
    metrics: dict[str, float] = {}
    extra: dict[str, list] = {}
    inpaint = "<think>.</think><answer>" + " ".join(ann["hidden_genes"]) + "</answer>"
    dual = DualReward(
        generate=lambda ps: [
            inpaint if "hidden" in p[-1]["content"] or "missing" in p[-1]["content"] else "x" for p in ps
        ]
    )
    completions = [_c(f"<think>t</think><answer>{ann['answer']}</answer>"), _c("unparseable")]
    scores = dual(
        prompts=None,
        completions=[*completions, _c(f"<think>t</think><answer>{gen['answer']}</answer>")],
        log_metric=lambda name, value: metrics.__setitem__(name, value),
        log_extra=lambda column, values: extra.__setitem__(column, values),
        **_columns([ann, ann, gen]),
    )
    assert scores == [pytest.approx(1.0), 0.0, 0.0]
    assert metrics["dual/annotation/rwjs"] == pytest.approx(0.5)  # mean of 1.0 and 0.0
    assert metrics["dual/generation/accuracy"] == 0.0
    assert metrics["dual/annotation/reward"] == pytest.approx(0.5)
    assert extra["dual_completion"] == [inpaint, "", "x"]


def test_dual_reward_diagnostics_entropy_and_zero_variance(rows, caplog) -> None:
    """Label-free diagnostics: predicted-label entropy per task (with a collapse warning) and the share
    of groups (completions of one prompt) whose dual reward does not vary."""
    ann = [r for r in rows if r["task"] == "annotation"][:2]
    metrics: dict[str, float] = {}
    inpaint = "<think>.</think><answer>" + " ".join(ann[0]["hidden_genes"]) + "</answer>"
    dual = DualReward(generate=lambda ps: [inpaint for _ in ps])
    labels = [ann[0]["candidates"][0], ann[0]["candidates"][1]]
    # group 1: two different labels -> two rewards equal (same in-painting), group 2: same label twice
    batch = [ann[0], ann[0], ann[1], ann[1]]
    prompts = [r["prompt"] for r in batch]
    completions = [_c(f"<think>t</think><answer>{lab}</answer>") for lab in [*labels, labels[0], labels[0]]]
    dual(prompts=prompts, completions=completions, log_metric=metrics.__setitem__, **_columns(batch))
    assert metrics["dual/annotation/label_entropy"] == pytest.approx(
        -(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25))
    )
    assert 0.0 <= metrics["dual/annotation/zero_std_groups"] <= 1.0
    same = [_c(f"<think>t</think><answer>{labels[0]}</answer>")] * 8
    with caplog.at_level("WARNING"):
        dual(
            prompts=[ann[0]["prompt"]] * 8,
            completions=same,
            log_metric=metrics.__setitem__,
            **_columns([ann[0]] * 8),
        )
    assert metrics["dual/annotation/label_entropy"] == 0.0
    assert metrics["dual/annotation/zero_std_groups"] == 1.0  # one group, all rewards equal
    assert "collapsed to one class" in caplog.text


def test_every_reward_is_built_from_the_context_alone() -> None:
    """One factory signature: ``factory(context, **params)`` for every registered name, no other argument
    required."""
    import inspect

    for name, factory in REWARDS.items():
        parameters = list(inspect.signature(factory).parameters.values())
        assert parameters[0].name == "context", name
        required = [
            p.name
            for p in parameters[1:]
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert not required, (name, required)


def test_labels_reach_only_the_rewards_that_declare_them(pbmc) -> None:
    """``build_rewards`` hands a label-free reward the context without the prepared data; a run's context
    never holds the test split, and a self-supervised run's holds no prepared data at all."""
    from cellduality.rewards import register_reward
    from cellduality.rewards.registry import USES_LABELS as declared

    prepared = build_tasks(pbmc, config=TaskConfig(top_k=12, max_examples=6))
    assert "test" in prepared.datasets
    seen: dict[str, RewardContext] = {}

    def probe(name: str):
        def factory(context: RewardContext, **params):
            seen[name] = context
            return lambda prompts=None, completions=(), **columns: [None] * len(completions)

        return factory

    try:
        register_reward("probe_free", probe("probe_free"))
        register_reward("probe_labels", probe("probe_labels"), uses_labels=True)
        context = RewardContext.for_data(prepared, seed=3)
        build_rewards(["probe_free", "probe_labels"], context, weights=[1.0, 0.5])
        assert seen["probe_free"].prepared is None and seen["probe_free"].seed == 3
        assert seen["probe_free"].vocabularies == context.vocabularies
        assert seen["probe_labels"].prepared is context.prepared
        assert "test" not in context.prepared.datasets
        assert context.prepared.datasets["train"] is prepared.datasets["train"]  # in memory, not reloaded
        assert RewardContext.for_data(prepared, labelled=False).prepared is None
        from cellduality.data.schema import DataError

        with pytest.raises(DataError, match="reward_weights has 1 values for 2"):
            build_rewards(["probe_free", "probe_labels"], context, weights=[1.0])
    finally:
        REWARDS.pop("probe_free", None)
        REWARDS.pop("probe_labels", None)
        declared.discard("probe_labels")


def test_dual_reward_from_the_context_takes_its_readers_and_seed(rows) -> None:
    """The dual reward's policy, per-task readers and seed come from the context: the same scores and
    calls as a DualReward wired by hand."""
    ann = next(r for r in rows if r["task"] == "annotation")
    gen = next(r for r in rows if r["task"] == "generation")
    calls: list[str] = []

    def reader(name: str, answer: str):
        def generate(prompts):
            calls.append(name)
            return [answer for _ in prompts]

        return generate

    policy = reader("policy", f"<answer>{gen['condition']}</answer>")
    frozen = reader("frozen", "<think>.</think><answer>" + " ".join(ann["hidden_genes"]) + "</answer>")
    context = RewardContext(generate=policy, readers={"annotation": frozen}, seed=5)
    (dual,) = build_rewards(["dual"], context, params={"dual": {"num_samples": 2, "deterministic": True}})
    by_hand = DualReward(generate=policy, num_samples=2, seed=5, deterministic=True)
    by_hand.readers = {"annotation": frozen}
    completions = [
        _c(f"<think>t</think><answer>{ann['answer']}</answer>"),
        _c(f"<think>t</think><answer>{gen['answer']}</answer>"),
    ]
    built = dual(prompts=None, completions=completions, **_columns([ann, gen]))
    first = list(calls)
    calls.clear()
    assert by_hand(prompts=None, completions=completions, **_columns([ann, gen])) == built
    assert calls == first == ["policy", "frozen"]
    assert dual.seed == 5 and dual.num_samples == 2 and dual.deterministic
    assert dual.history == by_hand.history
