"""The demo's and the ablation's recipes: where they live, how they are read, and that they agree.

The sizes and settings of ``cellduality demo`` and ``cellduality ablation`` are YAML recipes read by
TRL's ``TrlParser`` (the parser of ``cellduality sft --config``), one per stage; these tests read every
packaged plan with the stages' own readers and check what the Python plans used to guarantee by
construction (an answer fits its token budget; the ablation's SFT and dual arm are the full demo's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellduality.ablation import ABLATION, TINY, plan_differences
from cellduality.data.schema import DataError
from cellduality.demo import FULL, QUICK
from cellduality.stages import RECIPES, STAGES, Plan, read_stage

REPO = Path(__file__).resolve().parents[1]
PLANS = {"demo/full": FULL, "demo/quick": QUICK, "ablation/full": ABLATION, "ablation/tiny": TINY}
RUN = {"output_dir": "out/x", "dataset": ["out/prepared/pbmc68k"], "seed": 3, "data_seed": 3}


def _read(plan: Plan, stage: str):
    """A stage's recipe as the stage reads it, with the run's flags where the stage takes some."""
    if stage == "prepare":
        return read_stage(plan, stage, {"seed": 3})
    if stage == "sft" or stage.startswith("grpo"):
        return read_stage(plan, stage, RUN)
    return read_stage(plan, stage)


def test_the_packaged_plans_are_in_the_package_and_linked_from_recipes() -> None:
    """Inside the package (so a pip-installed `cellduality demo` finds them), shipped as package data,
    and reachable from the repository's recipes/ as the docs name them."""
    assert {name: plan.folder for name, plan in PLANS.items()} == {n: RECIPES / n for n in PLANS}
    assert QUICK.label == "recipes/demo/quick"  # how a report names it, wherever the package is installed
    assert RECIPES.parent == REPO / "cellduality"
    package_data = next(
        line
        for line in (REPO / "pyproject.toml").read_text().splitlines()
        if line.startswith("cellduality = [")
    )
    assert '"recipes/*/*/*.yaml"' in package_data
    shipped = {p.relative_to(RECIPES.parent) for p in RECIPES.rglob("*.yaml")}
    assert len(shipped) == 22 and all(p.match("recipes/*/*/*.yaml") for p in shipped)
    for kind in ("demo", "ablation"):
        link = REPO / "recipes" / kind
        assert link.is_symlink() and link.resolve() == (RECIPES / kind).resolve()


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_recipe_of_a_plan_is_read_by_its_stage(name: str) -> None:
    from cellduality.train.configs import check_reward_mode

    plan = PLANS[name]
    needed = {"prepare", "sft", "grpo_dual", "eval", "dual_check"} | (
        {"grpo_oracle"} if name.startswith("ablation") else set()
    )
    assert {s for s in STAGES if plan.has(s)} == needed
    prepare, task_config = _read(plan, "prepare")
    assert prepare.datasets and task_config.seed == 3  # the run's seed, not the recipe's
    budget = 2 * task_config.top_k + 8  # an answer of top_k genes, and the tags around it
    cd, _, sft_args, model = _read(plan, "sft")
    assert cd.build_tiny_model and sft_args.use_cpu and not sft_args.bf16 and model.dtype == "float32"
    assert (sft_args.output_dir, sft_args.seed, cd.dataset) == ("out/x", 3, RUN["dataset"])
    for arm in ("grpo_dual", "grpo_oracle"):
        if plan.has(arm):
            cd, args, _ = _read(plan, arm)
            check_reward_mode(cd.reward_mode, cd.reward_funcs)
            assert len(args.reward_weights) == len(cd.reward_funcs)
            assert args.max_completion_length == cd.dual_max_new_tokens == budget
            assert args.per_device_train_batch_size % args.num_generations == 0
    (evaluation,) = _read(plan, "eval")
    (check,) = _read(plan, "dual_check")
    assert evaluation.max_new_tokens == check.max_new_tokens == budget
    assert evaluation.sampled == name.startswith("ablation")  # the demo scores greedy answers only


def test_the_ablation_runs_the_full_demo_as_its_sft_and_dual_arm() -> None:
    """The full demo is the ablation's SFT and dual arm, seed 0 (the docs say so): the same fields."""
    for stage in ("prepare", "sft", "grpo_dual", "dual_check"):
        assert ABLATION.fields(stage) == FULL.fields(stage), stage
    for plan in (ABLATION, TINY):
        dual, oracle = plan.fields("grpo_dual"), plan.fields("grpo_oracle")
        differ = {k for k in dual.keys() | oracle.keys() if dual.get(k) != oracle.get(k)}
        assert differ == {"reward_mode", "reward_funcs"}, differ  # the same run, other rewards
        assert oracle["reward_funcs"] == ["format", "oracle_eval"]  # what eval scores
    assert ABLATION.fields("eval")["max_examples"] is None  # every test row


def test_a_changed_plan_is_read_and_recorded_with_its_changes(tmp_path) -> None:
    plan = TINY.replace("grpo_dual", max_steps=7, dual_frozen_tasks=["annotation"]).replace(
        "prepare", rl_examples=3
    )
    assert TINY.fields("grpo_dual")["max_steps"] == 2  # the recipe itself is untouched
    cd, args, _ = _read(plan, "grpo_dual")
    assert args.max_steps == 7 and cd.dual_frozen_tasks == ["annotation"]
    assert _read(plan, "prepare")[1].rl_examples == 3
    record = plan.record()
    assert record["grpo_dual"]["max_steps"] == 7 and record["sft"] == TINY.record()["sft"]
    assert plan_differences(TINY.record(), record) == [
        "grpo_dual.dual_frozen_tasks",
        "grpo_dual.max_steps",
        "prepare.rl_examples",
    ]
    # a plan stored before plans were recipes (a flat dict of sizes) differs in every stage
    assert plan_differences({"top_k": 8}, record)[:2] == ["dual_check", "eval"]


def test_a_recipe_folder_of_ones_own_and_its_mistakes(tmp_path, capsys) -> None:
    """`--recipes FOLDER`: a copy of a packaged plan, edited; a mistyped field is one line naming it."""
    from cellduality.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    for stage in ("prepare", "sft", "grpo_dual", "eval", "dual_check"):
        (mine / f"{stage}.yaml").write_text((QUICK.recipe(stage)).read_text())
    fields = yaml.safe_load((mine / "sft.yaml").read_text())
    (mine / "sft.yaml").write_text(yaml.safe_dump({**fields, "num_train_epoch": 1}))
    plan = Plan.named(str(mine))
    assert plan.fields("eval") == QUICK.fields("eval") and plan.label == str(mine)
    with pytest.raises(
        DataError,
        match=r"unknown field in the recipe .*: num_train_epoch \(did you mean num_train_epochs\?\)",
    ):
        _read(plan, "sft")
    (mine / "eval.yaml").write_text("max_exampels: 3\n")
    with pytest.raises(DataError, match=r"max_exampels.*recipe .*eval\.yaml"):
        _read(plan, "eval")
    with pytest.raises(DataError, match=r"no grpo_oracle\.yaml recipe"):
        plan.recipe("grpo_oracle")
    assert main(["demo", "--recipes", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "no recipe folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a size and a folder of recipes: one or the other
        main(["demo", "--quick", "--recipes", str(mine)])
