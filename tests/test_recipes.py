"""Every recipe in recipes/ parses with TRL's TrlParser into our dataclasses and TRL's configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellduality.train.configs import check_reward_mode

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*/*.yaml"))
# bf16 recipes are for GPU machines: on this CPU the trainer config refuses bf16, so those two
# device fields are overridden for parsing and checked separately below
CPU_OVERRIDES = ["--bf16", "false", "--use_cpu", "true"]


def _parse(recipe: Path):
    raw = yaml.safe_load(recipe.read_text())
    overrides = CPU_OVERRIDES if raw.get("bf16") else []
    if recipe.stem.startswith("sft"):
        from cellduality.train.sft import parse_args
    else:
        from cellduality.train.grpo import parse_args
    return raw, parse_args(["--config", str(recipe), *overrides])


def test_there_are_recipes() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in RECIPES}
    for model in ("llama-3.2-3b", "tiny-cpu"):
        assert {f"{model}/sft.yaml", f"{model}/grpo_dual.yaml", f"{model}/grpo_oracle.yaml"} <= names
        assert f"{model}/grpo_neighbourhood.yaml" in names
    assert "tiny-cpu/sft_neighbourhood.yaml" in names  # the tiny neighbourhood GRPO's SFT step


@pytest.mark.parametrize("name", ["grpo_dual", "grpo_oracle", "grpo_neighbourhood"])
def test_tiny_grpo_recipes_are_the_step_after_their_sft_recipe(name: str) -> None:
    """Each says which SFT recipe comes first (its comment gives the command), and a run started without
    it stops within its max_steps with the diagnosis instead of training on rewards that never vary."""
    root = RECIPES[0].parents[1] / "tiny-cpu"
    text = (root / f"{name}.yaml").read_text()
    sft = "sft_neighbourhood" if name == "grpo_neighbourhood" else "sft"
    assert f"cellduality sft  --config recipes/tiny-cpu/{sft}.yaml" in text
    assert f"--model_name_or_path outputs/tiny-cpu/{sft}" in text
    raw = yaml.safe_load(text)
    sft_raw = yaml.safe_load((root / f"{sft}.yaml").read_text())
    assert sft_raw["output_dir"] == f"outputs/tiny-cpu/{sft}"
    assert (sft_raw["dataset"], sft_raw["tasks"]) == (raw["dataset"], raw["tasks"])
    assert 0 < raw["zero_variance_stop_steps"] < raw["max_steps"]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_parses(recipe: Path) -> None:
    raw, parsed = _parse(recipe)
    cd_args, *_, training_args, model_args = parsed
    assert model_args.model_name_or_path == raw["model_name_or_path"]
    assert training_args.output_dir == raw["output_dir"]
    if not recipe.stem.startswith("sft"):
        check_reward_mode(cd_args.reward_mode, cd_args.reward_funcs)
        assert len(training_args.reward_weights) == len(cd_args.reward_funcs)
    if recipe.parent.name == "tiny-cpu":
        assert raw["use_cpu"] is True and raw["bf16"] is False and cd_args.build_tiny_model


def test_paper_hyper_parameters() -> None:
    """The 3B recipes map the paper's settings onto TRL's (see docs/recipes.md)."""
    root = Path(__file__).resolve().parents[1] / "recipes" / "llama-3.2-3b"
    sft = yaml.safe_load((root / "sft.yaml").read_text())
    assert sft["num_train_epochs"] == 3 and sft["learning_rate"] == 1e-5 and sft["bf16"] is True
    for name in ("grpo_dual", "grpo_oracle", "grpo_neighbourhood", "grpo_dual_vllm_server"):
        g = yaml.safe_load((root / f"{name}.yaml").read_text())
        gpus = 8
        per_optimizer_step = gpus * g["per_device_train_batch_size"] * g["gradient_accumulation_steps"]
        per_generation = gpus * g["per_device_train_batch_size"] * g["steps_per_generation"]
        assert g["num_generations"] == 8  # group size
        assert per_optimizer_step // g["num_generations"] == 32  # mini-batch of prompts
        assert per_generation // g["num_generations"] == 512  # prompts per RL step
        rl_steps = g["max_steps"] * per_optimizer_step // per_generation
        assert rl_steps == 200


def test_vllm_server_recipe_generates_on_the_server() -> None:
    """The server recipe is grpo_dual.yaml with generation moved to a `vllm serve` server, nothing else."""
    root = Path(__file__).resolve().parents[1] / "recipes" / "llama-3.2-3b"
    server = yaml.safe_load((root / "grpo_dual_vllm_server.yaml").read_text())
    base = yaml.safe_load((root / "grpo_dual.yaml").read_text())
    assert server["use_vllm"] is True and server["vllm_mode"] == "server" and server["auto_vllm"] is False
    _, parsed = _parse(root / "grpo_dual_vllm_server.yaml")
    training_args = parsed[-2]
    assert training_args.use_vllm and training_args.vllm_mode == "server"
    assert training_args.vllm_server_port == 8000 and training_args.vllm_server_timeout == 900
    moved = {"auto_vllm", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization", "output_dir"}
    moved.add("vllm_max_model_length")  # colocate only: the server takes it as --max-model-len
    moved |= {k for k in server if k.startswith("vllm_server")}
    assert {k: v for k, v in server.items() if k not in moved} == {
        k: v for k, v in base.items() if k not in moved
    }


# -- a mistyped field is one line ----------------------------------------------------------------


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_a_mistyped_field_is_one_line_with_the_close_match(stage: str, tmp_path: Path, capsys) -> None:
    """On the command line and in the YAML: exit 2, one line naming the field and the close match."""
    from cellduality.cli import main

    recipe = RECIPES[0].parents[1] / "tiny-cpu" / ("sft.yaml" if stage == "sft" else "grpo_dual.yaml")
    typo = tmp_path / "typo.yaml"
    typo.write_text(recipe.read_text() + "\nnum_generatons: 4\n")
    cases = [
        ([stage, "--config", str(recipe), "--learnin_rate", "1e-4"],
         "unknown field on the command line: learnin_rate (did you mean learning_rate?)"),
        ([stage, "--config", str(typo)], f"unknown field in the recipe {typo}: num_generatons (did you mean "),
        ([stage, "--config", str(tmp_path / "missing.yaml")], "cannot read the recipe"),
        ([stage, str(recipe)], f"unexpected argument '{recipe}' (a recipe: --config {recipe})"),
    ]  # fmt: skip
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(f"cellduality {stage}: error:")]
        assert len(lines) == 1 and expected in lines[0], (argv, err)
        assert "Traceback" not in err and "HfArgumentParser" not in err, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["prepare", "--dataset", "pbmc68k", "--outt", "x"], "--outt: did you mean --out?"),
        (["predict", "--task", "annotation", "--model", "m", "--out", "x.h5ad", "--overwite"],
         "--overwite: did you mean --overwrite?"),
        (["eval", "--prepared", "p", "--modle", "m", "--out", "o"], "--modle: did you mean --model?"),
        (["sft-data", "--data", "pbmc68k", "--out", "o", "--teacher-modle", "m"],
         "--teacher-modle: did you mean --teacher-model?"),
    ],
)  # fmt: skip
def test_a_mistyped_flag_of_any_command_names_the_close_match(argv: list[str], expected: str, capsys) -> None:
    """argparse's own error, one line, exit 2, named by the subcommand and with the flag that was meant."""
    from cellduality.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"cellduality {argv[0]}: error:"), lines
    assert expected in lines[0] and lines[0].endswith(f"(see cellduality {argv[0]} --help)"), lines[0]
