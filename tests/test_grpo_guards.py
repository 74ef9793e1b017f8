"""A GRPO run that cannot learn stops with the reason; one that can is left alone (real TRL, tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_dual.yaml"


def test_grpo_from_an_untrained_model_stops_with_the_diagnosis(tmp_path: Path, capsys) -> None:
    """The tiny recipe run on the untrained tiny model (what `cellduality grpo` did when run before SFT):
    nothing parses, every group's reward is the same, so after 2 steps: one line, exit 2, no model saved
    (before: the run trained its 3 steps with loss 0 and printed `saved to`)."""
    from cellduality.cli import main

    out = tmp_path / "run"
    argv = [
        "grpo",
        "--config",
        str(RECIPE),
        "--output_dir",
        str(out),
        "--prepared_dir",
        str(tmp_path / "prepared"),
    ]
    argv += ["--model_name_or_path", str(tmp_path / "model"), "--max_train_examples", "8"]
    argv += ["--max_steps", "3", "--save_strategy", "no", "--zero_variance_stop_steps", "2"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("cellduality grpo: error:")]
    assert len(lines) == 1, captured.err
    assert "no learning signal: for 2 steps every group of completions got the same reward" in lines[0]
    assert "start GRPO from an SFT checkpoint" in lines[0] and str(tmp_path / "model") in lines[0]
    assert "saved to" not in captured.out + captured.err and "Traceback" not in captured.err
    assert not (out / "cellduality_run.json").exists() and not (out / "model.safetensors").exists()
    logged = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in logged if "frac_reward_zero_std" in x]
    assert [x["step"] for x in steps] == [1, 2] and all(x["frac_reward_zero_std"] == 1.0 for x in steps)


def test_one_step_with_variance_disarms_the_stop_and_short_runs_are_not_judged() -> None:
    """The callback's rule on TRL's logged metric, step by step (transformers' own state and control)."""
    import pytest
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from cellduality.train.guards import NoLearningSignal, ZeroVarianceStop

    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])

    def run(shares: list[float], steps: int = 3, resumed_at: int = 0) -> tuple[ZeroVarianceStop, list[int]]:
        guard, control = ZeroVarianceStop(steps, "m"), TrainerControl()
        state = TrainerState(global_step=resumed_at)
        guard.on_train_begin(args, state, control)
        stopped_at = []
        for share in shares:
            state.global_step += 1
            guard.on_log(args, state, control, logs={"frac_reward_zero_std": share, "reward": -0.3})
            if control.should_training_stop:
                stopped_at.append(state.global_step)
                break
        return guard, stopped_at

    guard, stopped_at = run([1.0, 1.0, 1.0, 1.0])
    assert stopped_at == [3]
    with pytest.raises(NoLearningSignal, match=r"for 3 steps .* \(reward -0.30\)"):
        guard.on_train_end(args, TrainerState(), TrainerControl())
    guard, stopped_at = run([1.0, 0.75, 1.0, 1.0, 1.0])  # one step with a signal: never stopped
    assert stopped_at == [] and guard.signal
    guard.on_train_end(args, TrainerState(), TrainerControl())
    assert run([1.0, 1.0])[1] == []  # shorter than N: not judged
    assert run([1.0] * 4, steps=0)[1] == []  # 0 turns it off
    assert run([1.0, 1.0, 1.0], resumed_at=8)[1] == [11]  # a resumed run: N of its own steps


def test_the_diagnosis_names_the_sft_recipe_of_the_run_s_tasks() -> None:
    from types import SimpleNamespace

    from cellduality.train.configs import CellDualityArguments
    from cellduality.train.guards import ZeroVarianceStop

    model = SimpleNamespace(model_name_or_path="outputs/tiny-cpu/model_neighbourhood")
    guard = ZeroVarianceStop.for_run(CellDualityArguments(tasks=["neighbourhood"]), model)
    text = guard.diagnosis(3)
    assert (
        "recipes/tiny-cpu/sft_neighbourhood.yaml, then --model_name_or_path outputs/tiny-cpu/sft_neighbourhood"
        in text
    )
    guard = ZeroVarianceStop.for_run(CellDualityArguments(tasks=["annotation", "generation"]), model)
    assert "recipes/tiny-cpu/sft.yaml, then --model_name_or_path outputs/tiny-cpu/sft)" in guard.diagnosis(3)
    assert guard.steps == 10  # the default when a recipe does not set zero_variance_stop_steps
