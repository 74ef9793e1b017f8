"""Every tiny recipe, run as the docs say it is run, learns: its GRPO rewards vary inside groups.

A GRPO recipe whose completions never parse gets the same reward for every completion of a prompt:
every advantage is 0, the loss is 0, and the run still ends with "saved to". So each documented flow is
run here with the `cellduality` command from a user's working folder (the recipes' relative paths:
``recipes/...`` in, ``outputs/tiny-cpu/...`` out): the SFT recipe first, then every GRPO recipe that
names it as its step before (``--model_name_or_path outputs/tiny-cpu/<sft>``), with the recipes' own
settings. Each GRPO run must exit 0 and log, on some step, a group whose rewards differ
(TRL's ``frac_reward_zero_std`` below 1 and ``reward_std`` above 0): a reward that never varies fails.
The ``sft`` recipe's run is the session's shared one (``sft_checkpoint`` in conftest.py, made by the
same command in a user's working folder), which other tests start from too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny-cpu"
# SFT recipe -> the GRPO recipes documented as its next step (docs/recipes.md, each recipe's comment)
FLOWS = {"sft": ["grpo_dual", "grpo_oracle"], "sft_neighbourhood": ["grpo_neighbourhood"]}

pytestmark = pytest.mark.slow  # one SFT recipe (about a minute on 2 CPU cores) and its GRPO recipes


def _command(*argv: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cellduality"), *argv]


_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _cellduality(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """One command alone, on every core (torch's default), as a user runs the SFT step."""
    return subprocess.run(_command(*argv), cwd=cwd, env=_ENV, capture_output=True, text=True, timeout=900)


def _cellduality_together(commands: dict[str, list[str]], cwd: Path) -> dict[str, tuple[int, str]]:
    """Independent commands at once (one torch thread each, as a user with two terminals would run the
    documented GRPO recipes after the same SFT): name -> (exit status, stderr)."""
    logs = {name: cwd / f"{name}.stderr" for name in commands}  # files, so no pipe fills up and blocks
    running = {}
    for name, argv in commands.items():
        with logs[name].open("w") as err:
            running[name] = subprocess.Popen(
                _command(*argv),
                cwd=cwd,
                env={**_ENV, "OMP_NUM_THREADS": "1"},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
    return {name: (process.wait(timeout=900), logs[name].read_text()) for name, process in running.items()}


def _log_history(output_dir: Path) -> list[dict]:
    """The run's logs, from its newest checkpoint (the recipes save every few steps)."""
    states = sorted(output_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    assert states, f"{output_dir} holds no checkpoint"
    return json.loads(states[-1].read_text())["log_history"]


def test_every_tiny_recipe_is_in_a_flow() -> None:
    named = {name for sft, grpos in FLOWS.items() for name in (sft, *grpos)}
    assert named == {p.stem for p in TINY.glob("*.yaml")}


@pytest.mark.parametrize("sft", sorted(FLOWS))
def test_tiny_recipe_flow_learns_as_documented(sft: str, tmp_path: Path, request) -> None:
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    if sft == "sft":
        # the session's shared run of this recipe, made the same way (conftest.py), linked where the
        # docs' GRPO commands look for it; the fixture fails this test if GRPO wrote into it
        shared = request.getfixturevalue("sft_checkpoint")
        (tmp_path / "outputs" / "tiny-cpu").mkdir(parents=True)
        (tmp_path / "outputs" / "tiny-cpu" / sft).symlink_to(shared, target_is_directory=True)
    else:
        done = _cellduality("sft", "--config", f"recipes/tiny-cpu/{sft}.yaml", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "outputs" / "tiny-cpu" / sft / "cellduality_run.json").is_file()
    runs = {
        grpo: [
            "grpo",
            "--config",
            f"recipes/tiny-cpu/{grpo}.yaml",
            "--model_name_or_path",
            f"outputs/tiny-cpu/{sft}",
        ]
        for grpo in FLOWS[sft]
    }
    for grpo, (status, err) in _cellduality_together(runs, tmp_path).items():
        assert status == 0, f"{grpo}: {err[-2000:]}"
    for grpo in FLOWS[sft]:
        logs = [e for e in _log_history(tmp_path / "outputs" / "tiny-cpu" / grpo) if "reward_std" in e]
        assert logs, f"{grpo} logged no reward"
        zero = [e["frac_reward_zero_std"] for e in logs]
        assert min(zero) < 1.0 and max(e["reward_std"] for e in logs) > 0, (
            f"{grpo} after {sft}: no group's reward varied in {len(logs)} steps (frac_reward_zero_std {zero})"
        )
