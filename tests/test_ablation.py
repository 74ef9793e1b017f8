"""``cellduality ablation`` on a tiny budget: three arms per seed, the report, and resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cellduality.ablation import gap_closed, interval


def test_gap_closed_and_interval() -> None:
    assert gap_closed(0.5, 0.6, 0.7) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.6, 0.5) is None  # the oracle does not beat SFT: undefined
    assert gap_closed(0.5, 0.4, 0.7) == pytest.approx(-0.5)
    mean, low, high = interval([0.1, 0.2, 0.3])
    assert low < mean < high and mean == pytest.approx(0.2)
    assert interval([0.4]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(v) for v in interval([]))


def test_summarise_over_seeds() -> None:
    """Three seeds' metrics -> mean and interval per arm, gap closed over the seeds where it is defined."""
    from cellduality.ablation import summarise

    def metrics(sft: float, dual: float, oracle: float) -> dict:
        methods = {
            "SFT": {"kind": "model", "metrics": {"accuracy": sft}},
            "dual GRPO": {"kind": "model", "metrics": {"accuracy": dual}},
            "oracle GRPO": {"kind": "model", "metrics": {"accuracy": oracle}},
            "majority class": {"kind": "baseline", "metrics": {"accuracy": 0.3}},
        }
        return {"pbmc68k": {"tasks": {"annotation": {"methods": methods}}}}

    seeds = [{"metrics": metrics(*v)} for v in ((0.5, 0.6, 0.7), (0.5, 0.55, 0.6), (0.6, 0.6, 0.6))]
    (row,) = summarise(seeds)
    assert row["SFT"][0] == pytest.approx(0.5333, abs=1e-3) and row["SFT"][1] < row["SFT"][0] < row["SFT"][2]
    assert row["gap_closed"][0] == pytest.approx(0.5) and row["gap_closed_defined"] == "2/3 seeds"
    assert row["baselines"] == {"majority class": 0.3}


def _metrics(sft: list, dual: list, oracle: list) -> dict:
    """One seed's evaluation with per-test-cell scores, as ``run_eval`` writes it."""
    methods = {
        arm: {"kind": "model", "metrics": {"accuracy": sum(v) / len(v)}, "per_row": v}
        for arm, v in (("SFT", sft), ("dual GRPO", dual), ("oracle GRPO", oracle))
    }
    return {"pbmc68k": {"tasks": {"annotation": {"methods": methods}}}}


def _run(seed: int, rise: float, signal: bool, cells: tuple[list, list, list], zero: float = 0.2) -> dict:
    """One seed as ``run_seed`` returns it: curves (dual reward rising by ``rise``), dual checks, the
    per-cell scores of each arm (greedy and sampled alike) and the training figures."""
    curve = [(s, 0.3 + rise * s / 9) for s in range(1, 10)]
    check = {
        "task": "annotation",
        "carries_signal": signal,
        "gaps": [{"gap": 0.2, "ci_low": 0.1, "ci_high": 0.3}],
        "grpo": {"parsed": 0.9, "zero_variance": 0.4},
    }
    training = {"zero_std": {"annotation": [(1, zero), (2, zero)]}, "parsed": {}, "collapse": {}}
    return {
        "seed": seed,
        "metrics": _metrics(*cells),
        "sampled": _metrics(*cells),
        "curves": {"dual GRPO": {"annotation": curve}, "oracle GRPO": {"annotation": curve}},
        "training": {"dual GRPO": training, "oracle GRPO": training},
        "dual_check": {"SFT": [check], "dual GRPO": [check]},
    }


def test_goal_parts_follow_the_measured_numbers() -> None:
    """Each part of the goal is judged from paired per-cell differences: met when they say so, else why."""
    from cellduality.ablation import summarise
    from cellduality.ablation_goal import assess, goal_markdown, paired_bootstrap, pooled_cells

    rng = np.random.default_rng(0)
    sft = (rng.random(60) < 0.4).astype(float).tolist()
    # the oracle fixes 30 of the wrong cells, dual 15 of those: half the gap, both clearly above 0
    wrong = [i for i, v in enumerate(sft) if v == 0]
    oracle = [1.0 if i in wrong[:30] else v for i, v in enumerate(sft)]
    dual = [1.0 if i in wrong[:15] else v for i, v in enumerate(sft)]
    runs = [_run(s, 0.1, True, (sft, dual, oracle)) for s in range(3)]
    cells = pooled_cells(runs, "sampled", "pbmc68k", "annotation")
    assert cells.shape == (180, 3)
    boot = paired_bootstrap(cells)
    assert boot["dual_minus_sft"][1] > 0 and boot["oracle_minus_sft"][1] > 0
    assert boot["gap_closed"][0] == pytest.approx(0.5) and boot["gap_closed"][1] < 0.5 < boot["gap_closed"][2]
    good = assess(summarise(runs), runs)
    (t,) = good["tasks"]
    assert t["dual_beats_sft"] and t["oracle_beats_sft"] and t["dual_reward_rise"][0] > 0
    # one task of the two needed for parts 1 and 2; half the gap closed; the dual reward rises
    assert [p["met"] for p in good["parts"]] == [False, False, True, True]

    # half the gap closed on average, but dual GRPO also breaks right cells, so its gain over SFT is not
    # above 0 (the share's interval reaches below 0): part 3 is not met on a point estimate alone
    right = [i for i, v in enumerate(sft) if v == 1]
    noisy_oracle = [1.0 if i in wrong[:4] else v for i, v in enumerate(sft)]
    noisy = [1.0 if i in wrong[:4] else (0.0 if i in right[:2] else v) for i, v in enumerate(sft)]
    runs = [_run(s, 0.1, True, (sft, noisy, noisy_oracle)) for s in range(3)]
    weak = assess(summarise(runs), runs)
    (t,) = weak["tasks"]
    assert t["gap_closed"][0] >= 0.35 and t["gap_closed"][1] < 0 and t["oracle_beats_sft"]
    assert not weak["parts"][2]["met"]

    # dual no better than SFT on a cell, the oracle within noise, the dual reward falling: every part
    # fails and the table says why (zero-variance groups on the RL pool's prompts)
    flat = [_run(s, -0.1, True, (sft, sft, [*sft[:1], 1.0, *sft[2:]]), zero=0.8) for s in range(3)]
    bad = assess(summarise(flat), flat)
    assert [p["met"] for p in bad["parts"]] == [False, False, False, False]
    assert bad["parts"][2]["measured"] == "none measurable"
    text = "\n".join(goal_markdown(bad))
    assert "zero-variance groups on RL-pool prompts: dual GRPO 80%, oracle GRPO 80%" in text
    # a dual check that fails on one seed removes the task from part 4 (nothing to rise there)
    mixed = [_run(0, -0.1, False, (sft, sft, sft)), *flat[1:]]
    assert assess(summarise(mixed), mixed)["parts"][3]["measured"].startswith("0 of 0")


def _ablation(out: Path, *extra: str) -> subprocess.Popen:
    """``cellduality ablation --tiny --seeds 0 ... --out out`` started, one torch thread; its standard error
    goes to ``<out>.stderr`` (appended to), so a run nobody reads from meanwhile never blocks on a pipe."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(Path(sys.executable).parent / "cellduality"), "ablation", "--tiny", "--seeds", "0", *extra]
    with _stderr(out).open("a") as err:
        return subprocess.Popen(
            [*command, "--out", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _stderr(out: Path) -> Path:
    return out.with_name(out.name + ".stderr")


def _finished(out: Path, process: subprocess.Popen) -> Path:
    """Wait for the run; its report folder, or a failure with the end of its standard error."""
    status = process.wait(timeout=900)
    assert status == 0, _stderr(out).read_text()[-2000:]
    return out / "report"


class _Started:
    """A command started in the background: its report folder once it has ended."""

    def __init__(self, out: Path, process: subprocess.Popen) -> None:
        self.out, self.process = out, process

    def report(self) -> Path:
        return _finished(self.out, self.process)


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Iterator[_Started]:
    """``cellduality ablation --tiny --seeds 0 --pool-sizes 4``, started once without interruption and left
    running: it takes one core (one torch thread), so the killed runs below use the other meanwhile."""
    out = tmp_path_factory.mktemp("whole")
    run = _Started(out, _ablation(out, "--pool-sizes", "4"))
    yield run
    if run.process.poll() is None:  # a test failed before waiting for it
        os.killpg(run.process.pid, signal.SIGKILL)
        run.process.wait(timeout=60)


@pytest.fixture(scope="module")
def uninterrupted(started: _Started) -> Path:
    """The uninterrupted run's report folder, once it has ended. Shared by the tests below; they copy it
    before writing (``test_tiny_ablation_resumes``) or only read its report."""
    return started.report()


@pytest.mark.slow
def test_ablation_killed_inside_each_stage_resumes_to_the_same_report(
    started: _Started, tmp_path: Path
) -> None:
    """SIGKILL while a stage is half-written (its folder exists, its ``.done`` marker does not), then the
    same command again, for each stage in turn: killed inside ``prepared``; run again and killed inside
    ``sft``; run again and killed inside ``grpo``; run again, it finishes, and its report's rows equal
    those of a run never interrupted. (One chain instead of one run per stage: every resumption still
    meets a half-written stage; the uninterrupted run also trained the RL-pool size 4, which comes after
    these stages and does not enter the rows.) The uninterrupted run goes on meanwhile on the other core."""
    out = tmp_path / "killed"
    for stage in ("prepared", "sft", "grpo"):
        folder = out / "seed0" / stage
        run = _ablation(out)
        deadline = time.monotonic() + 600
        while not (folder.is_dir() and any(folder.iterdir())) and time.monotonic() < deadline:
            assert run.poll() is None, f"the run ended before the stage to kill ({stage}) began"
            time.sleep(0.02)
        assert not (folder / ".done").exists(), f"the stage {stage} finished before it could be killed"
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(timeout=60)
        assert not (folder / ".done").exists(), stage  # left half-written, as a kill leaves it
    report = _finished(out, _ablation(out))
    rows = [json.loads((r / "ablation.json").read_text())["rows"] for r in (started.report(), report)]
    assert rows[0] == rows[1]


@pytest.mark.slow
def test_tiny_ablation_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    """The tiny one-seed ablation with one extra RL-pool size (the module's run, made by the command), its
    report, and a second run (in this process, on a copy of its folder) that trains nothing again."""
    import shutil

    from cellduality.ablation import run_ablation, tiny_config

    shutil.copytree(uninterrupted.parent, tmp_path / "abl", symlinks=True)
    config = replace(tiny_config(tmp_path / "abl", seeds=(0,)), pool_sizes=(4,))  # the command's config
    report = tmp_path / "abl" / "report"
    payload = json.loads((report / "ablation.json").read_text())
    rows = {(r["dataset"], r["task"]): r for r in payload["rows"]}
    assert {t for _, t in rows} == {"annotation", "generation", "drug_sensitivity", "perturbation"}
    for row in rows.values():
        for arm in ("SFT", "dual GRPO", "oracle GRPO"):
            assert len(row["per_seed"][arm]) == 1  # one value per seed and arm
        assert row["gap_closed"] is None or len(row["gap_closed"]) == 3
    # the perturbation data is the demo's (glioblastoma_panobinostat: one perturbation, nothing to hold out)
    meta = json.loads(
        (tmp_path / "abl" / "seed0" / "prepared" / "glioblastoma_panobinostat" / "meta.json").read_text()
    )
    assert meta["split"]["perturbation"]["mode"] == "id"
    run = payload["runs"][0]
    assert set(run["dual_check"]) == {"SFT", "dual GRPO"}
    assert run["curves"]["dual GRPO"] and run["curves"]["oracle GRPO"]
    text = (report / "report.md").read_text()
    assert "gap closed" in text and "| perturbation |" in text and "## Against the goal" in text
    assert len(payload["goal"]["parts"]) == 4 and len(payload["goal"]["tasks"]) == 4
    assert payload["goal"]["mode"] == "sampled" and payload["sampled_rows"]
    # the paper's data design: an RL pool per task, GRPO's prompts from it, the oracle aligned with eval
    assert set(meta["split"]["perturbation"]) >= {"sft_examples", "rl_pool"}
    assert run["training"]["oracle GRPO"]["frac_reward_zero_std"]
    assert set(run["training"]["dual GRPO"]) >= {"zero_std", "parsed", "collapse"}
    annotation = payload["runs"][0]["metrics"]["pbmc68k"]["tasks"]["annotation"]
    assert len(annotation["methods"]["SFT"]["per_row"]) == annotation["n_examples"]  # one score per test cell
    # the label-efficiency curve: the extra pool size trained from the seed's own SFT checkpoint (linked)
    pool = tmp_path / "abl" / "pool_sizes" / "rl4" / "seed0"
    assert (pool / "sft").is_symlink() and (pool / "grpo" / "model.safetensors").is_file()
    curve = payload["pool_curve"]["pbmc68k/annotation"]
    assert set(curve) == {"4", str(config.plan.fields("prepare")["rl_examples"])}
    assert "## Label efficiency" in text
    for png in ("arms.png", "reward_curves.png", "pool_sizes.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"
    # run again: every stage is read back from its marker, nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("model.safetensors")}
    run_ablation(config)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("model.safetensors")} == stamps
    assert json.loads((report / "ablation.json").read_text())["rows"] == payload["rows"]
    # resuming under another plan would mix two sizes in one table: refused in one line, nothing touched
    steps = config.plan.fields("grpo_dual")["max_steps"]
    other = replace(config, plan=config.plan.replace("grpo_dual", max_steps=steps + 1))
    with pytest.raises(SystemExit, match=r"another plan \(grpo_dual\.max_steps differ\)"):
        run_ablation(other)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("model.safetensors")} == stamps
