"""``cellduality dual-check``: it must tell a dual reward that separates right from wrong answers from one
that does not, and it must run end to end on a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import DatasetDict

from cellduality.eval.dual_check import (
    DualCheckConfig,
    check_task,
    counterfactuals,
    paired_gap,
)
from cellduality.tasks import TaskConfig, build_tasks
from cellduality.tasks.build import PreparedTasks
from cellduality.tasks.dual import CLASSIFICATION_TASKS, dual_prompt


@pytest.fixture(scope="module")
def pbmc_prepared():
    from cellduality.data import load_dataset

    return build_tasks(load_dataset("pbmc68k"), config=TaskConfig(top_k=16, max_examples=80, seed=0))


class TeacherPolicy:
    """A real, data-backed policy for the dual prompts: the offline teacher (training-split profiles).

    It answers from the prompt alone (looked up among the dual prompts the check can build), either
    reading the forward answer in the prompt (``reads_answer``) or ignoring it (answering as if the
    first candidate had been given): the second is exactly the failure dual-check must catch.
    """

    def __init__(self, prepared: PreparedTasks, rows: list[dict], reads_answer: bool) -> None:
        from cellduality.teacher.offline import OfflineTeacher

        train = PreparedTasks(DatasetDict({"train": prepared.datasets["train"]}), prepared.meta)
        self.teacher = OfflineTeacher(train, concise=True)
        self.lookup: dict[str, tuple[dict, str]] = {}
        for row in rows:
            answers = set(row["candidates"]) if row["task"] in CLASSIFICATION_TASKS else set()
            answers |= {a for values in counterfactuals(rows, 0).values() for a in values if a}
            for answer in answers:
                self.lookup[json.dumps(dual_prompt(row, answer))] = (row, answer)
        self.reads_answer = reads_answer

    def __call__(self, prompts):
        out = []
        for prompt in prompts:
            row, answer = self.lookup[json.dumps(prompt)]
            if not self.reads_answer:
                answer = sorted(row["candidates"])[0] if row["task"] in CLASSIFICATION_TASKS else "CD74"
            out.append(self.teacher.answer(row, dual_answer=answer))
        return out


@pytest.mark.parametrize("task", ["annotation", "generation"])
def test_check_separates_a_reading_policy_from_a_blind_one(pbmc_prepared, task) -> None:
    rows = [dict(r) for r in pbmc_prepared.datasets["test"] if r["task"] == task][:40]
    cfg = DualCheckConfig(grpo_view=False, n_resamples=500)
    reading = check_task(rows, TeacherPolicy(pbmc_prepared, rows, True), None, cfg, pbmc_prepared.genes)
    blind = check_task(rows, TeacherPolicy(pbmc_prepared, rows, False), None, cfg, pbmc_prepared.genes)
    assert reading.carries_signal, reading.verdict
    gap = reading.gaps[0]
    assert gap.ci_low > 0 and gap.right > gap.wrong and gap.better > gap.worse
    assert not blind.carries_signal and blind.verdict.startswith("no signal")
    assert blind.gaps[0].tied == pytest.approx(1.0)


def test_paired_gap_interval() -> None:
    rng = np.random.default_rng(0)
    right = rng.random(200) * 0.5 + 0.3
    gap = paired_gap(right, right - 0.2 + rng.normal(0, 0.05, 200), "other", 1000, 0)
    assert gap.ci_low < 0.2 < gap.ci_high and gap.ci_low > 0.15
    same = paired_gap(right, right, "other", 1000, 0)
    assert same.gap == same.ci_low == same.ci_high == 0.0 and same.tied == 1.0


def test_counterfactuals_use_real_cells_of_other_conditions(pbmc_prepared) -> None:
    rows = [dict(r) for r in pbmc_prepared.datasets["test"] if r["task"] == "generation"]
    cf = counterfactuals(rows, 0)
    by_answer = {r["answer"]: r["condition"] for r in rows}
    for row, wrong in zip(rows, cf["other condition"], strict=True):
        assert wrong is not None and by_answer[wrong] != row["condition"]


def test_dual_check_command_on_a_checkpoint(tmp_path, pbmc_prepared) -> None:
    """End to end on a real (untrained) tiny checkpoint: files written, every task checked, the GRPO view
    measured, and an untrained policy judged to carry no signal (exit code 1)."""
    from cellduality.cli import main
    from cellduality.modeling import ensure_tiny_model
    from cellduality.tasks import save_prepared
    from cellduality.train.common import texts_of_tasks

    folder = save_prepared(pbmc_prepared, tmp_path / "prepared")
    model = ensure_tiny_model(tmp_path / "model", pbmc_prepared.genes, texts_of_tasks(pbmc_prepared))
    out = tmp_path / "check"
    argv = ["dual-check", "--model", str(model), "--prepared", str(folder), "--out", str(out)]
    code = main([*argv, "--max-rows", "6", "--group-size", "2", "--max-new-tokens", "12"])
    assert code == 1
    payload = json.loads((out / "dual_check.json").read_text())
    checks = {c["task"]: c for c in payload["checks"]}
    assert set(checks) == {"annotation", "generation"}
    for check in checks.values():
        assert check["gaps"] and check["gaps"][0]["n"] == 6
        assert check["grpo"]["groups"] == 6 and 0 <= check["grpo"]["zero_variance"] <= 1
        assert not check["carries_signal"] and check["verdict"].startswith("no signal")
    assert "| annotation |" in (out / "dual_check.md").read_text()
    assert Path(out / "dual_check.md").stat().st_size > 0


@pytest.mark.parametrize("task", ["annotation", "generation"])
def test_data_bound_sees_labels_only_where_the_data_carry_them(pbmc_prepared, task) -> None:
    """The reference reader (fitted on training labels) separates right from wrong answers on real cells,
    and does not once the training labels are shuffled: the bound measures the data, not the code."""
    from cellduality.data import load_dataset
    from cellduality.eval.dual_bound import ReferenceReader

    rows = [dict(r) for r in pbmc_prepared.datasets["test"] if r["task"] == task][:60]
    answers = counterfactuals(rows, 0)
    wrong_kind = next(k for k in answers if k != "right")

    def gap(prepared) -> float:
        reader = ReferenceReader(prepared)
        right = np.array([reader.score(r, a) for r, a in zip(rows, answers["right"], strict=True)])
        wrong = np.array([reader.score(r, a) for r, a in zip(rows, answers[wrong_kind], strict=True)])
        return paired_gap(right, wrong, wrong_kind, 500, 0)

    real = gap(pbmc_prepared)
    assert real.ci_low > 0.05, real
    data = load_dataset("pbmc68k")
    column = data.columns.cell_type
    data.adata.obs[column] = np.random.default_rng(1).permutation(data.adata.obs[column].to_numpy())
    shuffled = build_tasks(data, config=TaskConfig(top_k=16, max_examples=80, seed=0))
    noise = gap(shuffled)
    assert noise.ci_low < 0.02 and noise.gap < real.gap / 3, (noise, real)


def test_verdict_names_the_data_or_the_policy(pbmc_prepared) -> None:
    """A blind policy on informative data: the verdict says the policy, not the data, is at fault."""
    from cellduality.eval.dual_bound import ReferenceReader

    rows = [dict(r) for r in pbmc_prepared.datasets["test"] if r["task"] == "generation"][:40]
    cfg = DualCheckConfig(grpo_view=False, n_resamples=500)
    blind = check_task(
        rows,
        TeacherPolicy(pbmc_prepared, rows, False),
        None,
        cfg,
        pbmc_prepared.genes,
        ReferenceReader(pbmc_prepared),
    )
    assert not blind.carries_signal
    assert "the data allow it" in blind.verdict and "policy has not learned" in blind.verdict


def test_perturbation_wrong_answers_are_real_cells_of_other_conditions() -> None:
    """With one perturbation (glioblastoma: panobinostat vs ctrl), the wrong real cell is another control
    cell of the same patient, never the paired one; the paired control cell is its own kind."""
    from cellduality.data import load_dataset

    prepared = build_tasks(
        load_dataset("glioblastoma_panobinostat"), config=TaskConfig(top_k=16, max_examples=80, seed=0)
    )
    rows = [dict(r) for r in prepared.datasets["test"] if r["task"] == "perturbation"]
    cf = counterfactuals(rows, 0)
    assert set(cf) == {"right", "other condition", "control cell"}
    for row, wrong, paired in zip(rows, cf["other condition"], cf["control cell"], strict=True):
        assert paired == " ".join(row["cell_genes"][: row["n_genes"]])
        same_patient = {
            " ".join(o["cell_genes"][: o["n_genes"]]) for o in rows if o["context"] == row["context"]
        }
        assert wrong != paired and wrong in same_patient and wrong != row["answer"]
