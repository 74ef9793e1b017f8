"""SFT on offline-teacher traces, then dual GRPO from the SFT checkpoint (TRL trainers, tiny model, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SFT_RECIPE = REPO / "recipes" / "tiny-cpu" / "sft.yaml"
GRPO_RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_dual.yaml"


def _grpo_from(root: Path, model: Path, steps: int):
    """Dual GRPO (tiny recipe) for ``steps`` steps, starting from the checkpoint ``model``."""
    from cellduality.train.grpo import parse_args, run_grpo

    return run_grpo(
        *parse_args(
            [
                "--config",
                str(GRPO_RECIPE),
                "--output_dir",
                str(root / "grpo"),
                "--prepared_dir",
                str(root / "prepared_grpo"),
                "--model_name_or_path",
                str(model),
                "--build_tiny_model",
                "false",
                "--max_steps",
                str(steps),
                # after a few SFT steps nothing parses yet: these tests check mechanics and determinism, so
                # the learning-signal stop (3 steps in the tiny recipe) is off
                "--zero_variance_stop_steps",
                "0",
            ]
        )
    )


def test_sft_then_dual_grpo(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from cellduality.train.sft import parse_args as sft_args
    from cellduality.train.sft import run_sft

    sft_out = tmp_path / "sft"
    sft = run_sft(
        *sft_args(
            [
                "--config",
                str(SFT_RECIPE),
                "--output_dir",
                str(sft_out),
                "--model_name_or_path",
                str(tmp_path / "model"),
                "--sft_limit",
                "24",
                "--num_train_epochs",
                "1",
                "--per_device_train_batch_size",
                "8",
                "--logging_steps",
                "1",
            ]
        )
    )
    losses = [h["loss"] for h in sft.state.log_history if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    summary = json.loads((sft_out / "sft_data" / "summary.json").read_text())
    assert summary["totals"]["kept"] > 0 and summary["dataset"]["dual"] > 0  # dual examples were added
    meta = json.loads((sft_out / "cellduality_run.json").read_text())
    assert meta["stage"] == "sft" and meta["examples"] > 0
    assert AutoModelForCausalLM.from_pretrained(sft_out) is not None

    grpo = _grpo_from(tmp_path, sft_out, steps=2)
    logs = [h for h in grpo.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert all("rewards/dual/mean" in h for h in logs)


def test_sft_lora_merged_feeds_grpo(tmp_path) -> None:
    """SFT with LoRA saves the adapter and the merged model; GRPO starts from the merged folder."""
    from transformers import AutoModelForCausalLM

    from cellduality.train.sft import parse_args as sft_args
    from cellduality.train.sft import run_sft

    out = tmp_path / "sft"
    run_sft(
        *sft_args(
            [
                "--config",
                str(SFT_RECIPE),
                "--output_dir",
                str(out),
                "--model_name_or_path",
                str(tmp_path / "model"),
                "--sft_limit",
                "8",
                "--max_steps",
                "2",
                "--use_peft",
                "true",
                "--lora_r",
                "4",
                "--lora_alpha",
                "8",
                "--lora_target_modules",
                "q_proj",
                "v_proj",
            ]
        )
    )
    assert (out / "adapter_config.json").exists()
    merged = out / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    grpo = _grpo_from(tmp_path, merged, steps=1)
    assert grpo.state.global_step == 1


def test_same_seed_same_numbers(tmp_path) -> None:
    """The demo's promise: SFT then dual GRPO with the same seed log exactly the same numbers."""
    from cellduality.train.sft import parse_args as sft_args
    from cellduality.train.sft import run_sft

    def run(root: Path) -> list[dict]:
        common = ["--model_name_or_path", str(root / "model"), "--sft_limit", "12", "--max_steps", "3"]
        sft = run_sft(*sft_args(["--config", str(SFT_RECIPE), "--output_dir", str(root / "sft"), *common]))
        grpo = _grpo_from(root, root / "sft", steps=3)
        timing = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second")
        return [
            {k: v for k, v in h.items() if k not in timing}
            for h in sft.state.log_history + grpo.state.log_history
        ]

    assert run(tmp_path / "a") == run(tmp_path / "b")


def test_readme_path_keeps_the_sft_checkpoint(tmp_path, monkeypatch) -> None:
    """The README's step-by-step commands in order: the GRPO recipe (``build_tiny_model: true``) pointed
    at the SFT checkpoint trains from it and leaves every file of it byte for byte as it was."""
    import torch
    from safetensors.torch import load_file

    from cellduality.train.grpo import parse_args as grpo_args
    from cellduality.train.grpo import run_grpo
    from cellduality.train.sft import parse_args as sft_args
    from cellduality.train.sft import run_sft

    monkeypatch.chdir(tmp_path)  # the recipes' relative outputs/ paths land here, as for a user
    run_sft(*sft_args(["--config", str(SFT_RECIPE), "--sft_limit", "12", "--max_steps", "2"]))
    sft = tmp_path / "outputs" / "tiny-cpu" / "sft"
    before = {p.relative_to(sft): p.read_bytes() for p in sorted(sft.rglob("*")) if p.is_file()}
    assert Path("model.safetensors") in before and Path("cellduality_run.json") in before
    grpo = run_grpo(
        *grpo_args(["--config", str(GRPO_RECIPE), "--model_name_or_path", str(sft), "--max_steps", "1"])
    )
    after = {p.relative_to(sft): p.read_bytes() for p in sorted(sft.rglob("*")) if p.is_file()}
    assert after == before  # nothing deleted, nothing rewritten
    assert grpo.state.global_step == 1

    # GRPO started from the trained weights, not from a fresh tiny model: after its one step it is
    # nearer the SFT checkpoint than the SFT checkpoint is to the untrained model it came from
    def weights(folder: Path) -> torch.Tensor:
        state = load_file(str(folder / "model.safetensors"))
        return torch.cat([state[k].flatten() for k in sorted(state)])

    start, end = weights(sft), weights(tmp_path / "outputs/tiny-cpu/grpo_dual")
    fresh = weights(tmp_path / "outputs/tiny-cpu/model")
    assert torch.linalg.norm(end - start) < torch.linalg.norm(start - fresh)


def test_sft_subcommand_resumes_past_a_checkpoint_killed_mid_save(tmp_path, capsys) -> None:
    """`cellduality sft` (the subcommand): a checkpoint-N without trainer_state.json is moved aside and
    the run resumes from the newest complete one; the stage ends with its "saved to" line."""
    from cellduality.cli import main

    out = tmp_path / "sft"
    argv = ["sft", "--config", str(SFT_RECIPE), "--output_dir", str(out)]
    argv += ["--model_name_or_path", str(tmp_path / "model"), "--sft_limit", "8"]
    argv += ["--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "1"]
    assert main([*argv, "--max_steps", "2"]) == 0
    assert f"cellduality sft: saved to {out}" in capsys.readouterr().out
    broken = out / "checkpoint-7"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 64)  # killed while saving
    assert main([*argv, "--max_steps", "3"]) == 0
    captured = capsys.readouterr()
    assert f"{broken} is incomplete" in captured.err and "resuming from checkpoint-2" in captured.err
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (out / "incomplete-checkpoint-7").is_dir()
    meta = json.loads((out / "cellduality_run.json").read_text())
    assert meta["sentences"] == {"pbmc68k": {"top_k": 16, "n_genes": 16}}
