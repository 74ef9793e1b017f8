"""Dual GRPO under ``accelerate launch`` with two real CPU ranks: DDP (gloo), ZeRO-2 and ZeRO-3.

These prove rank symmetry: the dual reward makes one generation call per reward call on every rank,
also in steps where a rank has no example of a task the other rank has (asserted from each rank's
record of its calls). A rank that skipped a collective would hang the run, so every launch has a
timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_dual.yaml"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _launch(tmp: Path, launcher: list[str], env_extra: dict[str, str], steps: int = 4) -> Path:
    out = tmp / "run"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        # a folder of the test's own: what DeepSpeed compiles here shows up below
        "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions"),
        **env_extra,
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "-m",
        "cellduality.train.grpo",
        "--config",
        str(RECIPE),
        "--output_dir",
        str(out),
        "--prepared_dir",
        str(tmp / "prepared"),
        "--model_name_or_path",
        str(tmp / "model"),
        "--max_steps",
        str(steps),
        "--save_strategy",
        "no",
        # rank symmetry on the untrained tiny model, whose rewards never vary: the learning-signal stop is off
        "--zero_variance_stop_steps",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    # DeepSpeed's CPU shared-memory all-reduce kernel (inference only) is not compiled for a training run
    built = sorted(p.name for p in (tmp / "torch_extensions").glob("*/*"))
    assert not built and "built successfully" not in proc.stdout, built
    return out


def _check_symmetry(out: Path, steps: int) -> None:
    calls = [json.loads((out / f"dual_calls_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(calls[0]) == len(calls[1]) == steps, "every rank generates once per reward call"
    # the tiny recipe gives each rank one prompt per step, so ranks see different tasks in some steps
    uneven = [i for i in range(steps) if set(calls[0][i]["tasks"]) != set(calls[1][i]["tasks"])]
    assert uneven, f"no step where a rank lacked a task the other had: {calls}"
    # the policy itself generated as often on every rank (fillers included), not just the reward calls
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    generations = [r["policy_generations"] for r in ranks]
    assert generations[0] == generations[1] >= steps, generations
    assert (out / "model.safetensors").exists()


def test_ddp_two_cpu_ranks(tmp_path) -> None:
    out = _launch(
        tmp_path,
        ["--multi_gpu", "--num_processes", "2", "--mixed_precision", "no"],
        {"CELLDUALITY_ALLOW_CPU_MULTIPROCESS": "1"},
        steps=6,
    )
    _check_symmetry(out, 6)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_cpu_ranks(tmp_path, stage) -> None:
    pytest.importorskip("deepspeed")
    out = _launch(
        tmp_path,
        [
            "--config_file",
            str(REPO / "accelerate_configs" / f"{stage}.yaml"),
            "--num_processes",
            "2",
            "--mixed_precision",
            "no",
        ],
        {"CELLDUALITY_ALLOW_CPU_DEEPSPEED": "1"},
        steps=6,
    )
    _check_symmetry(out, 6)
