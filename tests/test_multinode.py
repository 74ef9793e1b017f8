"""Two "machines" on localhost train dual GRPO through the shipped multi-node accelerate config.

Each machine is its own ``accelerate launch --config_file accelerate_configs/multinode.yaml`` with its own
``--machine_rank`` (0 or 1), the same ``--main_process_ip 127.0.0.1`` / port and one process each, as
``slurm/train.slurm`` starts them on a cluster; torch.distributed runs over gloo on the CPU. The run
must train every step on both machines, make the same number of dual generation calls on each (rank
symmetry: a missing collective would hang it, hence the timeout) and end with the same weights on both
ranks, different from the weights it started from.
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


def test_two_machines_on_localhost_train_in_sync(tmp_path) -> None:
    steps = 4
    out = tmp_path / "run"
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
            "cellduality.train.grpo",
            "--config",
            str(RECIPE),
            "--output_dir",
            str(out),
            "--prepared_dir",
            str(tmp_path / "prepared"),
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--max_steps",
            str(steps),
            "--save_strategy",
            "no",
        ]
        log = (tmp_path / f"machine{machine_rank}.log").open("w")
        procs.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [proc.wait(timeout=900) for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    logs = [(tmp_path / f"machine{r}.log").read_text()[-4000:] for r in (0, 1)]
    assert codes == [0, 0], "\n\n".join(logs)

    ranks = [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["machine_rank"] for r in ranks] == [0, 1]  # one rank per machine
    assert [r["global_step"] for r in ranks] == [steps, steps]
    assert ranks[0]["dual_calls"] == ranks[1]["dual_calls"] == steps
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]  # both ranks hold the same weights
    assert ranks[0]["params_sha256"] == _digest(out)  # ... the ones saved
    assert _digest(tmp_path / "model") != ranks[0]["params_sha256"]  # and training changed them
    calls = [json.loads((out / f"dual_calls_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(calls[0]) == len(calls[1]) == steps
