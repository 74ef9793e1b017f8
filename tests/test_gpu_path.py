"""The 8-GPU path's known traps are guarded: server command, vLLM context length, ZeRO-3 gather, sync.

Each trap comes from a TRL / vLLM thread (docs/recipes.md, "Traps on the GPU path"); none needs a GPU
to be checked: the server command is compared with the flags TRL 1.16's own ``build_command`` imposes,
the recipes are parsed, the guard is called through the real entry point.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import pytest
import yaml

from cellduality.train.launch_guard import (
    LaunchError,
    check_generation_setup,
    check_training_setup,
    deepspeed_zero_stage,
)
from cellduality.train.monitor import IS_RATIO_KEY, ImportanceRatioWatch, importance_ratio_problem
from cellduality.train.progress import summary

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ROOT / "recipes" / "llama-3.2-3b"
SERVER_DOCS = [
    LLAMA / "grpo_dual_vllm_server.yaml",
    ROOT / "slurm" / "train.slurm",
    ROOT / "docs" / "recipes.md",
]


def test_server_is_started_with_the_flags_trl_imposes() -> None:
    """`trl vllm-serve` is deprecated in TRL 1.16 and only runs `vllm serve` with flags the trainer
    needs; every place that starts the server must carry them itself."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    command = build_command(ScriptArguments(model="m"))
    imposed = command[command.index("--weight-transfer-config") :]
    flags = {a: b for a, b in zip(imposed[::2], imposed[1::2], strict=True)}
    assert set(flags) >= {"--weight-transfer-config", "--logprobs-mode", "--max-logprobs"}
    for path in SERVER_DOCS:
        text = path.read_text()
        starts = [
            line for line in text.splitlines() if "vllm serve" in line and "VLLM_SERVER_DEV_MODE" in line
        ]
        assert starts or "VLLM_SERVER_DEV_MODE=1" in text, f"{path.name} does not start `vllm serve`"
        assert "trl vllm-serve --" not in text and "trl vllm-serve ..." not in text, path.name
        for flag, value in flags.items():
            assert flag in text, f"{path.name} starts the server without {flag}"
            shown = "nccl" if flag == "--weight-transfer-config" else value
            assert f"{flag} {shown}" in text or shown in text.split(flag, 1)[1][:40], (path.name, flag)
        assert "--max-model-len" in text, path.name


def test_vllm_recipes_bound_the_context() -> None:
    """Without vllm_max_model_length vLLM sizes its KV cache for the model's full context (128k for
    Llama-3.2) and runs out of memory at start-up at 0.3 of a GPU."""
    sft = yaml.safe_load((LLAMA / "sft.yaml").read_text())
    for recipe in LLAMA.glob("grpo_*.yaml"):
        g = yaml.safe_load(recipe.read_text())
        if not (g.get("use_vllm") or g.get("auto_vllm")) or g.get("vllm_mode") == "server":
            continue
        length = g.get("vllm_max_model_length")
        assert length, f"{recipe.name} can generate with vLLM but sets no vllm_max_model_length"
        assert (
            length >= g["max_completion_length"] + 1024 and length >= g.get("dual_max_new_tokens", 0) + 1024
        )
        assert length >= sft["max_length"]  # every sequence the SFT model was trained on fits


def test_zero3_without_gather_refused_for_hf_generation_only() -> None:
    with pytest.raises(LaunchError, match="ds3_gather_for_generation"):
        check_generation_setup(use_vllm=False, ds3_gather_for_generation=False, zero_stage=3)
    check_generation_setup(use_vllm=True, ds3_gather_for_generation=False, zero_stage=3)
    check_generation_setup(use_vllm=False, ds3_gather_for_generation=False, zero_stage=2)
    check_generation_setup(use_vllm=False, ds3_gather_for_generation=True, zero_stage=3)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    assert deepspeed_zero_stage(None, env) == 3 and deepspeed_zero_stage(None, {}) is None
    args = types.SimpleNamespace(use_vllm=False, ds3_gather_for_generation=False)
    with pytest.raises(LaunchError):
        check_training_setup(args, env)


def test_zero3_without_gather_is_one_line_from_the_entry_point(tmp_path, monkeypatch, capsys) -> None:
    """Through `cellduality grpo`: refused before any data or model is loaded, one line, status 2."""
    from cellduality.train.grpo import main

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("CELLDUALITY_ALLOW_CPU_DEEPSPEED", "1")  # this CPU machine stands in for GPUs
    argv = [
        "--config",
        str(ROOT / "recipes" / "tiny-cpu" / "grpo_dual.yaml"),
        "--ds3_gather_for_generation",
        "false",
        "--output_dir",
        str(tmp_path / "run"),
        "--prepared_dir",
        str(tmp_path / "prepared"),
    ]
    assert main(argv, prog="cellduality grpo") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and "ds3_gather_for_generation" in err[0]
        and err[0].startswith("cellduality grpo: error")
    )
    assert not (tmp_path / "prepared").exists()  # refused before anything was built


def test_importance_ratio_out_of_range_warns_in_log_and_bar(caplog) -> None:
    """TRL logs the mean importance-sampling ratio; far from 1 it means vLLM holds other weights
    (0.03 in huggingface/trl#5312, sleep mode without a re-push)."""
    watch = ImportanceRatioWatch()
    state = types.SimpleNamespace(global_step=7, is_world_process_zero=True)
    with caplog.at_level(logging.WARNING, logger="cellduality.train.monitor"):
        watch.on_log(None, state, None, logs={IS_RATIO_KEY: 0.0288, "loss": 0.1})
        watch.on_log(None, state, None, logs={IS_RATIO_KEY: 1.02, "loss": 0.1})
        watch.on_log(None, state, None, logs={"loss": 0.1})
    assert [step for step, _ in watch.warnings] == [7]
    assert len(caplog.records) == 1 and "outside [0.5, 2]" in caplog.records[0].getMessage()
    assert summary({IS_RATIO_KEY: 0.0288})["WARNING"] == "vLLM weights out of sync"
    assert (
        "WARNING" not in summary({IS_RATIO_KEY: 1.02}) and summary({IS_RATIO_KEY: 1.02})["is_ratio"] == "1.02"
    )
    assert importance_ratio_problem({IS_RATIO_KEY: 2.5}) is not None
    assert importance_ratio_problem({IS_RATIO_KEY: float("nan")}) is None
