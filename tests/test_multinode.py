"""Two "machines" on localhost train SFT, then dual GRPO, through the shipped multi-node accelerate config.

Each machine is its own ``accelerate launch --config_file accelerate_configs/multinode.yaml`` with its own
``--machine_rank`` (0 or 1), the same ``--main_process_ip 127.0.0.1`` / port and one process each, as
``slurm/train.slurm`` starts them on a cluster; torch.distributed runs over gloo on the CPU. Each run
must train every step on both machines and end with the same weights on both ranks (the digests of
``ranks/rank<N>.json``), different from the weights it started from; the GRPO run must make the same
number of dual generation calls on each (rank symmetry: a missing collective would hang it, hence the
timeout).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_dual.yaml"
SFT_RECIPE = REPO / "recipes" / "tiny-cpu" / "sft.yaml"
CONFIG = REPO / "accelerate_configs" / "multinode.yaml"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digest(model_dir: Path) -> str:
    """The sha256 ``write_rank_state`` computes, of a saved model's parameters (float32, by name)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        h.update(name.encode())
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _two_machines(tmp: Path, stage: str, recipe: Path, out: Path, *args: str) -> list[dict]:
    """Launch ``stage`` as two machines of one process each; every rank's ``ranks/rank<N>.json``."""
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "CELLDUALITY_ALLOW_CPU_MULTIPROCESS": "1",
    }
    procs = []
    for machine_rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(CONFIG),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine_rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            "-m",
            f"cellduality.train.{stage}",
            "--config",
            str(recipe),
            "--output_dir",
            str(out),
            "--prepared_dir",
            str(tmp / "prepared"),
            "--save_strategy",
            "no",
            *args,
        ]
        log = (tmp / f"{stage}_machine{machine_rank}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=900) for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp / f"{stage}_machine{r}.log").read_text()[-4000:] for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(logs)
    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["machine_rank"] for r in ranks] == [0, 1]  # one rank per machine
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]  # both ranks hold the same weights
    assert ranks[0]["params_sha256"] == _digest(out)  # ... the ones saved
    return ranks


def test_two_machines_on_localhost_train_sft_then_dual_grpo_in_sync(tmp_path, sft_checkpoint) -> None:
    # SFT goes on from the session's SFT checkpoint of this recipe for 24 steps (8 per device on 2 ranks =
    # the recipe's 16), so that the policy writes answers the rewards can score (an untrained model's
    # rewards are all 0: GRPO would have no advantage to learn from) without training it all again here
    sft = tmp_path / "sft"
    ranks = _two_machines(
        tmp_path,
        "sft",
        SFT_RECIPE,
        sft,
        "--model_name_or_path",
        str(sft_checkpoint),
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "24",
    )
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 24
    assert _digest(sft_checkpoint) != ranks[0]["params_sha256"]  # SFT changed the weights

    steps = 5
    out = tmp_path / "grpo"
    ranks = _two_machines(
        tmp_path,
        "grpo",
        RECIPE,
        out,
        "--model_name_or_path",
        str(sft),
        "--max_steps",
        str(steps),
        "--max_completion_length",
        "96",
    )
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert ranks[0]["dual_calls"] == ranks[1]["dual_calls"] == steps
    calls = [json.loads((out / f"dual_calls_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(calls[0]) == len(calls[1]) == steps
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any(entry.get("grad_norm", 0) > 0 for entry in log), log
    assert _digest(sft) != ranks[0]["params_sha256"]  # dual GRPO changed the weights
