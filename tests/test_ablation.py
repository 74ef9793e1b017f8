"""``cellduality ablation`` on a tiny budget: three arms per seed, the report, and resume."""

from __future__ import annotations

import json
import math
from dataclasses import replace

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


@pytest.mark.slow
def test_tiny_ablation_resumes(tmp_path) -> None:
    from cellduality.ablation import run_ablation, tiny_config

    config = tiny_config(tmp_path / "abl", seeds=(0,))
    report = run_ablation(config)
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
    assert "gap closed" in text and "| perturbation |" in text
    for png in ("arms.png", "reward_curves.png"):
        assert (report / png).read_bytes()[:4] == b"\x89PNG"
    # run again: every stage is read back from its marker, nothing is trained again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("model.safetensors")}
    run_ablation(config)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("model.safetensors")} == stamps
    assert json.loads((report / "ablation.json").read_text())["rows"] == payload["rows"]
    # resuming under another plan would mix two sizes in one table: refused in one line, nothing touched
    other = replace(config, plan=replace(config.plan, grpo_steps=config.plan.grpo_steps + 1))
    with pytest.raises(SystemExit, match="another plan \\(grpo_steps differ\\)"):
        run_ablation(other)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "abl").rglob("model.safetensors")} == stamps
