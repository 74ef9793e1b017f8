"""The monitor's figures reach the trainer's public log, not TRL's private metric store.

TRL 1.16 hands its public ``log_metric`` to reward functions only; a callback's public way is the
trainer's ``log`` (what ``log_history``, the reporters and the progress bar read). The trainer here is
what ``transformers.Trainer.log`` reads, so the call is the real one; the full run is
``tests/test_train_grpo.py::test_monitor_split_logs_agreement_without_labels_in_training``.
"""

from __future__ import annotations

import types
from collections import defaultdict
from typing import Any

from transformers import TrainerControl, TrainerState

from cellduality.train.monitor import DualMonitor


class _Trainer:
    """The state ``transformers.Trainer.log`` reads and the handler it calls, plus TRL's ``_metrics``."""

    def __init__(self) -> None:
        self.state = TrainerState(global_step=4, epoch=0.5)
        self.args = types.SimpleNamespace(include_num_input_tokens_seen="no")
        self.control = TrainerControl()
        self.seen_by_callbacks: list[dict[str, Any]] = []
        self._metrics: dict[str, defaultdict[str, list[float]]] = {"train": defaultdict(list)}

        def on_log(args: Any, state: Any, control: Any, logs: dict[str, Any]) -> Any:
            self.seen_by_callbacks.append(dict(logs))
            return control

        self.callback_handler = types.SimpleNamespace(on_log=on_log)


def test_monitor_figures_go_through_the_public_log(tmp_path, monkeypatch) -> None:
    trainer = _Trainer()
    monitor = DualMonitor(tmp_path, dual_reward=lambda **kw: [], sample=lambda p: [], vocabulary={}, every=2)
    figures = {"monitor/annotation/spearman": 0.4, "monitor/annotation/oracle": 0.7}
    monkeypatch.setattr(monitor, "check", lambda: dict(figures))  # the check itself runs in the full run
    monitor.trainer = trainer
    control = TrainerControl()
    monitor.on_step_end(None, types.SimpleNamespace(global_step=3), control)  # not a check step
    assert trainer.state.log_history == []
    monitor.on_step_end(None, types.SimpleNamespace(global_step=4), control)
    (entry,) = trainer.state.log_history
    assert entry["step"] == 4 and {k: entry[k] for k in figures} == figures
    assert trainer.seen_by_callbacks and figures.items() <= trainer.seen_by_callbacks[0].items()
    assert not trainer._metrics["train"]  # TRL's private store untouched
    assert not control.should_log  # the trainer's own logging cadence is left alone


def test_a_monitor_entry_keeps_the_progress_bar_figures(tmp_path) -> None:
    """The monitor's entry of its own carries no reward or loss: the bar keeps showing the last ones."""
    import io

    from tqdm.auto import tqdm

    from cellduality.train.progress import CompactProgress

    progress = CompactProgress(tmp_path)
    progress.training_bar = tqdm(total=10, file=io.StringIO())
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=2)
    progress.on_log(None, state, None, logs={"loss": 0.5, "reward": 0.25})
    progress.on_log(None, state, None, logs={"monitor/annotation/oracle": 0.7})
    assert "reward=0.25" in progress.training_bar.postfix
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2  # both entries logged


def test_a_run_in_a_used_folder_logs_its_own_steps_and_keeps_the_earlier_ones(tmp_path) -> None:
    """``make demo`` twice, or a run resumed from checkpoint-2 after steps 3 and 4 were logged: the log
    lists each step once, this run's, and the earlier entries are kept beside it, never deleted."""
    import json

    from cellduality.train.progress import CompactProgress

    log = tmp_path / "train_log.jsonl"
    earlier = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    log.write_text("".join(json.dumps(e) + "\n" for e in earlier) + '{"step": 5, "lo')  # cut by a kill

    def run(start: int, steps: range) -> list[dict]:
        progress = CompactProgress(tmp_path)
        state = types.SimpleNamespace(is_world_process_zero=True, global_step=start, max_steps=4)
        progress.on_train_begin(types.SimpleNamespace(disable_tqdm=True), state, None)
        for s in steps:
            state.global_step = s
            progress.on_log(None, state, None, logs={"loss": 10.0 * s})
        return [json.loads(line) for line in log.read_text().splitlines()]

    resumed = run(2, range(3, 5))  # resumed from checkpoint-2
    assert [(e["step"], e["loss"]) for e in resumed] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    first = (tmp_path / "train_log.earlier-1.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in first[:2]] == [3, 4] and first[2].startswith('{"step": 5')
    afresh = run(0, range(1, 3))  # the same command in the same folder, from the start
    assert [(e["step"], e["loss"]) for e in afresh] == [(1, 10.0), (2, 20.0)]
    second = [json.loads(x) for x in (tmp_path / "train_log.earlier-2.jsonl").read_text().splitlines()]
    assert [e["step"] for e in second] == [1, 2, 3, 4]
    assert run(2, range(3, 4))[-1]["step"] == 3 and not (tmp_path / "train_log.earlier-3.jsonl").exists()
