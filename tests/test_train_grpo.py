"""Dual-task GRPO with the real TRL trainer on the tiny model (one process, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cellduality.tasks.dual import dual_prompt
from cellduality.train.configs import check_reward_mode

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_dual.yaml"


def _args(tmp: Path, *extra: str):
    from cellduality.train.grpo import parse_args

    return parse_args(_args_list(tmp, *extra))


def _args_list(tmp: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(RECIPE),
        "--output_dir",
        str(tmp / "run"),
        "--prepared_dir",
        str(tmp / "prepared"),
        "--model_name_or_path",
        str(tmp / "model"),
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        *extra,
    ]


def test_reward_mode_guard() -> None:
    check_reward_mode("self_supervised", ["format", "dual"])
    check_reward_mode("combined", ["format", "dual", "oracle"])
    with pytest.raises(ValueError, match="uses no labels"):
        check_reward_mode("self_supervised", ["format", "oracle"])
    with pytest.raises(ValueError, match="ground truth only"):
        check_reward_mode("oracle", ["dual", "oracle"])
    with pytest.raises(ValueError, match="unknown reward"):
        check_reward_mode("oracle", ["nope"])


@pytest.fixture(scope="module")
def dual_run(tmp_path_factory):
    from cellduality.modeling import decode, draws
    from cellduality.train.grpo import run_grpo

    tmp = tmp_path_factory.mktemp("grpo")
    before, drawn = decode.steps_taken, draws.rows_drawn
    trainer = run_grpo(*_args(tmp))
    _LEAN_STEPS.append(decode.steps_taken - before)
    _DRAWN_ROWS.append(draws.rows_drawn - drawn)
    return tmp, trainer


#: decoding steps the dual run took through cellduality.modeling.decode's lean step
_LEAN_STEPS: list[int] = []
#: rows whose token the run drew with torch's own draws made in bulk (cellduality.modeling.draws)
_DRAWN_ROWS: list[int] = []


def test_dual_grpo_trains_logs_and_saves(dual_run) -> None:
    tmp, trainer = dual_run
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert any(k.startswith("dual/") for h in logs for k in h), "per-task dual metrics must be logged"
    assert all("rewards/dual/mean" in h for h in logs)
    # no label reached the trainer in self-supervised mode: not the answer, not the original cell id,
    # and the trainer holds no prepared dataset (train or test answers) on any attribute
    assert not {"answer", "cell_id"} & set(trainer.train_dataset.column_names)
    from datasets import Dataset, DatasetDict

    from cellduality.tasks.build import PreparedTasks

    held = [
        name
        for name, value in vars(trainer).items()
        if isinstance(value, (PreparedTasks, DatasetDict))
        or (isinstance(value, Dataset) and "answer" in value.column_names)
    ]
    assert not held, f"the trainer carries labelled data on {held}"
    out = tmp / "run"
    meta = json.loads((out / "cellduality_run.json").read_text())
    assert meta["reward_mode"] == "self_supervised" and meta["prepared"]["genes"]
    calls = json.loads((out / "dual_calls_rank0.json").read_text())
    assert len(calls) == 2  # one dual generation per reward call, also when nothing parsed
    # the CPU run took the shared-prompt paths (tests/test_shared_prompts.py: they are TRL's up to rounding)
    assert trainer.shared_prefills == 2 and trainer.packed_forwards == 2
    # and its rollouts and dual generations decoded through the lean step (tests/test_decode.py: the
    # same tokens as Hugging Face's own forward)
    assert _LEAN_STEPS and _LEAN_STEPS[0] > 0
    assert _DRAWN_ROWS and _DRAWN_ROWS[0] > 0  # the rollouts' sampled tokens took the bulk variates
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert (out / "checkpoint-2").is_dir()


def test_policy_generator_uses_trainer_model(dual_run) -> None:
    _, trainer = dual_run
    generator = trainer.cellduality_dual.generate
    row = dict(trainer.train_dataset[0])
    prompt = dual_prompt(row, row["candidates"][0] if row["task"] == "annotation" else "CD74 FTL")
    model = trainer.model
    model.train()
    calls = generator.calls
    texts = generator([prompt, prompt])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1]  # greedy: same prompt, same answer
    assert model.training, "generation must hand the model back in train mode"
    assert generator.calls == calls + 1
    assert generator([]) == []  # an empty batch still generates (filler) and returns nothing


def test_resume_from_checkpoint(dual_run) -> None:
    from cellduality.train.grpo import run_grpo

    tmp, first = dual_run
    before = [h for h in first.state.log_history if "loss" in h]
    # the run left checkpoint-2; asking for 3 steps resumes there and trains one more step
    trainer = run_grpo(*_args(tmp, "--max_steps", "3"))
    after = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and [h["step"] for h in after] == [1, 2, 3]
    # steps 1-2 come from the checkpoint's state, not from training them again
    assert [h["step_time"] for h in after[:2]] == [h["step_time"] for h in before]


def test_oracle_mode_with_lora(tmp_path) -> None:
    from cellduality.train.grpo import run_grpo

    trainer = run_grpo(
        *_args(
            tmp_path,
            "--reward_mode",
            "oracle",
            "--reward_funcs",
            "format",
            "oracle",
            "--reward_weights",
            "0.2",
            "1.0",
            "--use_peft",
            "true",
            "--lora_r",
            "4",
            "--lora_alpha",
            "8",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
        )
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("rewards/oracle/mean" in h for h in logs)
    assert "answer" in trainer.train_dataset.column_names
    assert (tmp_path / "run" / "adapter_config.json").exists()


def test_verifier_rewards_train_from_the_runs_data_in_memory(tmp_path) -> None:
    """A verifier reward is built like every other, from the run's reward context: it trains, and nothing
    is saved for it to read back (no ``prepared_for_verifiers`` folder, no environment variable)."""
    from cellduality.train.grpo import run_grpo

    trainer = run_grpo(
        *_args(
            tmp_path,
            "--dataset",
            "glioblastoma_panobinostat",
            "--tasks",
            "perturbation",
            "--reward_mode",
            "oracle",
            "--reward_funcs",
            "format",
            "verifier_pearson",
            "--reward_weights",
            "0.2",
            "1.0",
            "--max_steps",
            "1",
            "--save_steps",
            "10",
        )
    )
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(h["rewards/verifier_pearson/mean"]) for h in logs)
    assert not (tmp_path / "run" / "prepared_for_verifiers").exists()


def test_compact_progress_keeps_full_logs(dual_run) -> None:
    """The bar shows a few figures; every full log entry is in the run folder's train_log.jsonl."""
    from cellduality.train.progress import CompactProgress, summary

    tmp, trainer = dual_run
    assert any(isinstance(c, CompactProgress) for c in trainer.callback_handler.callbacks)
    lines = [json.loads(x) for x in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert len(steps) >= 2 and all("rewards/dual/mean" in x for x in steps)
    short = summary(steps[0])
    assert "step_time" in short and len(short) < 12 and any(k.startswith("dual:") for k in short)


def test_report_to_trackio_offline(tmp_path) -> None:
    """``report_to: trackio`` logs the run's metrics to a local database: no network, no account.

    Run in a fresh process: trackio reads TRACKIO_DIR once, when it is first imported."""
    import os
    import sqlite3
    import subprocess
    import sys

    pytest.importorskip("trackio", reason="the `track` extra is not installed (make test installs it)")
    argv = [
        str(a)
        for a in _args_list(
            tmp_path, "--max_steps", "1", "--report_to", "trackio", "--run_name", "offline-run"
        )
    ]
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "cellduality.train.grpo", *argv], check=True, env=env, timeout=600)
    db = tmp_path / "trackio" / "huggingface.db"
    rows = sqlite3.connect(db).execute("select run_name, metrics from metrics").fetchall()
    assert rows and {name for name, _ in rows} == {"offline-run"}
    assert any("train/rewards/dual/mean" in json.loads(m) for _, m in rows)


def test_monitor_split_logs_agreement_without_labels_in_training(tmp_path) -> None:
    """The monitor holds labelled rows out of training and logs how the dual reward agrees with the
    truth on them; the trainer keeps only the monitor's folder, never its rows."""
    from datasets import load_from_disk

    from cellduality.train.grpo import run_grpo
    from cellduality.train.monitor import DualMonitor

    trainer = run_grpo(*_args(tmp_path, "--monitor_rows", "2", "--monitor_steps", "1"))
    monitor = load_from_disk(str(tmp_path / "run" / "monitor"))
    assert len(monitor) == 4 and "answer" in monitor.column_names  # 2 per task, labelled, on disk
    assert not set(monitor["id"]) & set(trainer.train_dataset["id"])  # never trained on
    logged = {k for h in trainer.state.log_history for k in h if k.startswith("monitor/")}
    assert {"monitor/annotation/oracle", "monitor/generation/oracle"} <= logged
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, DualMonitor)]
    assert isinstance(callback.folder, str) and not any(
        hasattr(v, "column_names") for v in vars(callback).values()
    )


def test_resume_skips_a_checkpoint_killed_mid_save(dual_run, tmp_path, capsys) -> None:
    """The newest checkpoint-N lacks trainer_state.json (killed while saving): the same command again
    moves it aside with a note and resumes from the newest complete checkpoint."""
    import shutil

    from cellduality.train.common import checkpoint_complete
    from cellduality.train.grpo import run_grpo

    tmp, _ = dual_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    complete = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*") if checkpoint_complete(p))
    broken = run / f"checkpoint-{complete + 5}"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 100)  # the save stopped here
    trainer = run_grpo(
        *_args(
            tmp_path,
            "--model_name_or_path",
            str(tmp / "model"),
            "--prepared_dir",
            str(tmp / "prepared"),
            "--max_steps",
            str(complete + 1),
        )
    )
    assert trainer.state.global_step == complete + 1
    err = capsys.readouterr().err
    assert f"{broken} is incomplete" in err and f"resuming from checkpoint-{complete}" in err
    assert not broken.exists() and (run / f"incomplete-{broken.name}" / "model.safetensors").exists()


def test_last_checkpoint_skips_incomplete_ones(tmp_path, capsys) -> None:
    from cellduality.data.schema import DataError
    from cellduality.train.common import check_resume, last_checkpoint

    for step, state in ((2, "{}"), (4, None), (6, "{trunc")):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert last_checkpoint(str(tmp_path), main_process=False) == str(tmp_path / "checkpoint-2")
    assert (tmp_path / "checkpoint-6").exists()  # other ranks only read
    assert last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-2",
        "incomplete-checkpoint-4",
        "incomplete-checkpoint-6",
    ]
    assert capsys.readouterr().err.count("is incomplete") == 2
    with pytest.raises(DataError, match="incomplete"):
        check_resume(str(tmp_path / "incomplete-checkpoint-6"))
    check_resume(str(tmp_path / "checkpoint-2"))
    empty = tmp_path / "fresh"
    (empty / "checkpoint-1").mkdir(parents=True)
    assert last_checkpoint(str(empty)) is None and "starts afresh" in capsys.readouterr().err


NEIGHBOURHOOD_RECIPE = REPO / "recipes" / "tiny-cpu" / "grpo_neighbourhood.yaml"


def test_neighbourhood_grpo_trains_logs_and_evaluates(tmp_path) -> None:
    """A few GRPO steps of neighbourhood editing on norman_devel (CRISPRa K562 + the McFaline-Figueroa
    CRISPRi lines) with the tiny model: rewards and per-task metrics reach TRL's logs; `cellduality eval`
    then reports the edited predictor next to the unedited graph neighbour and the baselines."""
    from cellduality.cli import main
    from cellduality.train.grpo import parse_args, run_grpo

    args = parse_args(
        [
            "--config",
            str(NEIGHBOURHOOD_RECIPE),
            "--output_dir",
            str(tmp_path / "run"),
            "--prepared_dir",
            str(tmp_path / "prepared"),
            "--model_name_or_path",
            str(tmp_path / "model"),
            "--max_steps",
            "2",
            "--save_steps",
            "2",
        ]
    )
    trainer = run_grpo(*args)
    train = trainer.train_dataset
    assert set(train["task"]) == {"neighbourhood"} and "answer" in train.column_names
    assert {"cell type: k562", "cell type: A172"} <= set(train["context"])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    for h in logs:
        for name in ("neighbourhood_format", "neighbourhood_validity", "neighbourhood_gain"):
            assert math.isfinite(h[f"rewards/{name}/mean"])
        assert "neighbourhood_gain/neighbourhood/pearson_gain" in h
        assert "neighbourhood_validity/neighbourhood/empty_edit_rate" in h
    meta = json.loads((tmp_path / "run" / "cellduality_run.json").read_text())
    assert meta["reward_mode"] == "oracle" and "neighbourhood_gain" in meta["reward_funcs"]
    # evaluation on the held-out targets of the same prepared folder
    out = tmp_path / "eval"
    code = main(
        [
            "eval",
            "--prepared",
            str(tmp_path / "prepared"),
            "--model",
            f"{tmp_path / 'run'},name=GRPO",
            "--tasks",
            "neighbourhood",
            "--max-new-tokens",
            "24",
            "--no-plots",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    methods = json.loads((out / "metrics.json").read_text())["tasks"]["neighbourhood"]["methods"]
    assert {"GRPO", "graph neighbourhood, unedited", "mean perturbation", "control mean"} <= set(methods)
    assert methods["split-half reproducibility"]["kind"] == "reference"
    grpo = methods["GRPO"]["metrics"]
    assert {"pearson_delta", "pearson_delta_de", "retrieval", "valid_output_rate"} <= set(grpo)
    assert "graph neighbourhood, unedited" in (out / "report.md").read_text()


def test_reference_reader_answers_with_the_weights_grpo_started_from(tmp_path) -> None:
    """``dual_frozen_tasks: [all]``: the dual is answered by the starting checkpoint, frozen, whatever the
    policy's weights become; the policy reader answers with the policy's current weights. The policy is
    moved by hand (noise on every weight): an untrained tiny model's rewards are all 0, so training
    would not move it."""
    import torch
    from transformers import AutoModelForCausalLM

    from cellduality.train.grpo import build_grpo_trainer

    trainer = build_grpo_trainer(*_args(tmp_path, "--dual_frozen_tasks", "all"))
    generator = trainer.cellduality_dual.readers["annotation"]
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    rows = [dict(trainer.train_dataset[i]) for i in range(4)]
    prompts = [dual_prompt(r, r["candidates"][0] if r["task"] == "annotation" else "CD74 FTL") for r in rows]
    tok = generator.tokenizer

    def greedy(model) -> list[str]:  # the prompts answered outside the trainer
        texts = []
        for messages in prompts:
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            out = model.generate(ids, max_new_tokens=generator.max_new_tokens, do_sample=False)
            texts.append(generator._decode([out[0, ids.shape[1] :].tolist()])[0])
        return texts

    policy = trainer.accelerator.unwrap_model(trainer.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    assert greedy(policy.eval()) != greedy(start), "the moved policy answers as before: nothing to tell apart"
    reader = trainer.accelerator.unwrap_model(generator.reference)
    assert reader is not policy and not any(p.requires_grad for p in reader.parameters())
    assert generator(prompts) == greedy(start)
    generator.reader = "policy"
    assert generator(prompts) == greedy(policy.eval())


def test_frozen_tasks_wiring(tmp_path) -> None:
    """``dual_frozen_tasks``: the frozen reader answers the named tasks' duals (the routing itself is tested
    in test_rewards), the policy every other task's; a task without a dual is one line."""
    from cellduality.data.schema import DataError
    from cellduality.train.grpo import build_grpo_trainer

    trainer = build_grpo_trainer(*_args(tmp_path, "--dual_frozen_tasks", "annotation", "generation"))
    dual = trainer.cellduality_dual
    assert dual.generate.reader == "policy" and set(dual.readers) == {"annotation", "generation"}
    (reference,) = {id(r): r for r in dual.readers.values()}.values()
    assert reference.reader == "reference" and reference.trainer is trainer
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.accelerator.unwrap_model(reference.reference) is not policy
    with pytest.raises(DataError, match="neighbourhood has no dual"):
        _args(tmp_path, "--dual_frozen_tasks", "neighbourhood")
