"""A training run killed part-way and run again with the same command ends where an uninterrupted one ends.

The kill is an exception raised at the end of step 3, after ``checkpoint-2`` was saved and before step 3
was: what a SIGKILL at that moment leaves on disk. It is injected through the trainer's callbacks (the
training itself is TRL's, untouched); the second run of the same command resumes from ``checkpoint-2``
(``last_checkpoint``), and its final weights must equal those of a run that was never interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes" / "tiny-cpu" / "sft.yaml"
GRPO_RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_dual.yaml"
KILL_AT = 3

pytestmark = pytest.mark.slow  # three short training runs each (about a minute each on 2 CPU cores)


class Killed(Exception):
    """Stands for the process dying at the end of a step."""


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _killed_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next trainer built dies at the end of ``step`` (after the callbacks that save checkpoints)."""
    from transformers import TrainerCallback

    import cellduality.train.progress as progress

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Killed(f"killed at the end of step {step}")

    original = progress.use_compact_progress

    def with_kill(trainer, output_dir) -> None:
        original(trainer, output_dir)
        trainer.add_callback(KillAt())

    monkeypatch.setattr(progress, "use_compact_progress", with_kill)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, start: Path) -> None:
    """``a`` and ``b`` hold the same weights, and training moved them away from ``start`` (else equal is trivial)."""
    wa, wb, w0 = _weights(a), _weights(b), _weights(start)
    assert sorted(wa) == sorted(wb)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= 1e-6, f"resumed and uninterrupted runs differ by up to {worst}"
    moved = max(float((wa[k] - w0[k]).abs().max()) for k in wa if k in w0)
    assert moved > 1e-4, "training did not change the weights: the comparison would prove nothing"


def _run_twice(stage: str, argv_for, tmp: Path, monkeypatch: pytest.MonkeyPatch):
    """The uninterrupted run, then the killed one and its resumption; returns their output folders."""
    if stage == "sft":
        from cellduality.train.sft import parse_args
        from cellduality.train.sft import run_sft as run
    else:
        from cellduality.train.grpo import parse_args
        from cellduality.train.grpo import run_grpo as run
    whole, killed = tmp / "whole", tmp / "killed"
    run(*parse_args(argv_for(whole)))
    with monkeypatch.context() as patch:
        _killed_at(KILL_AT, patch)
        with pytest.raises(Killed):
            run(*parse_args(argv_for(killed)))
    assert (killed / "checkpoint-2").is_dir() and not (killed / "model.safetensors").exists()
    trainer = run(*parse_args(argv_for(killed)))  # the same command again
    assert trainer.state.global_step == 4
    steps = [h["step"] for h in trainer.state.log_history if "loss" in h]
    assert steps == [1, 2, 3, 4]  # 1-2 from checkpoint-2's state, 3-4 trained again

    # every step trained, as it was logged: 1-2 by the killed run (dead before step 3's log), 3-4 after the
    # resumption; a second run that started over would have logged 1, 2, 1, 2, 3, 4
    logged = [json.loads(x) for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "loss" in x] == [1, 2, 3, 4]
    return whole, killed


def test_sft_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    model = tmp_path / "model"

    def argv(out: Path) -> list[str]:
        return [
            "--config", str(SFT_RECIPE), "--output_dir", str(out), "--model_name_or_path", str(model),
            "--sft_limit", "8", "--max_steps", "4", "--per_device_train_batch_size", "4",
            "--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "3", "--logging_steps", "1",
        ]  # fmt: skip

    whole, killed = _run_twice("sft", argv, tmp_path, monkeypatch)
    _assert_same_weights(whole, killed, model)


def test_grpo_killed_and_resumed_ends_like_an_uninterrupted_run(
    tmp_path, monkeypatch, sft_checkpoint
) -> None:
    """From the session's tiny SFT checkpoint (conftest.py; read, never written), which any trained
    checkpoint would serve: its completions vary in length (asserted below), so the sampling RNG matters,
    and weight decay (1.0) moves the weights whatever the advantages, as a function of the optimiser and
    scheduler state. The resumption must restore all three."""
    sft = sft_checkpoint

    def argv(out: Path) -> list[str]:
        return [
            "--config", str(GRPO_RECIPE), "--output_dir", str(out), "--model_name_or_path", str(sft),
            "--prepared_dir", str(tmp_path / "prepared"), "--max_train_examples", "16", "--max_steps", "4",
            "--save_steps", "2", "--save_total_limit", "3", "--zero_variance_stop_steps", "0",
            "--learning_rate", "1e-3", "--weight_decay", "1.0",
        ]  # fmt: skip

    whole, killed = _run_twice("grpo", argv, tmp_path, monkeypatch)
    _assert_same_weights(whole, killed, sft)
    # the completions sampled at steps 3 and 4 are the same ones: the sampling RNG was restored
    keys = ("completions/mean_length", "completions/clipped_ratio", "reward", "frac_reward_zero_std")

    def sampled(folder: Path) -> list[tuple]:
        logged = [json.loads(x) for x in (folder / "train_log.jsonl").read_text().splitlines()]
        return [tuple(x[k] for k in keys) for x in logged if "loss" in x and x["step"] >= KILL_AT]

    assert sampled(killed) == sampled(whole) and len(sampled(whole)) == 2
    logged = [json.loads(x) for x in (whole / "train_log.jsonl").read_text().splitlines()]
    lengths = [x["completions/mean_length"] for x in logged if "loss" in x]
    assert len(set(lengths)) > 1, "the sampled lengths never changed: the RNG check would prove nothing"
