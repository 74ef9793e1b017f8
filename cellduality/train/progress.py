"""What a person watches during training: one progress bar with the few figures that matter.

TRL prints its whole metrics dictionary (40 keys under GRPO) at every logging step. This callback
replaces transformers' ``ProgressCallback``: the bar (steps, time left) carries the loss or the reward
of each task and the step time as its postfix, and every full log entry goes to
``<output_dir>/train_log.jsonl`` (one JSON object a line, appended as it happens, so a crash loses
nothing) and to ``report_to`` as before.

The log holds one run's history: when training begins, entries past the step it starts from (all of
them for a run that starts afresh in a used folder, such as ``make demo`` run twice; those after the
checkpoint for a resumed run, which trains them again) move to ``train_log.earlier-N.jsonl`` beside it,
kept, so that the log never lists a step twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers.trainer_callback import ProgressCallback

#: postfix keys, in order: the reward of each task and the figures that say whether training works
_KEEP = ("loss", "reward", "step_time", "kl")


def summary(logs: dict[str, Any]) -> dict[str, str]:
    """The few figures of a log entry: per-task dual / oracle rewards, reward, loss, step time, KL."""
    out: dict[str, str] = {}
    for key, value in logs.items():
        if not isinstance(value, (int, float)):
            continue
        parts = key.split("/")
        if len(parts) == 3 and parts[0] in ("dual", "oracle") and parts[2] in ("reward", "mean"):
            out[f"{parts[0]}:{parts[1][:5]}"] = f"{value:.3f}"
    for key in _KEEP:
        if isinstance(logs.get(key), (int, float)):
            out[key] = f"{logs[key]:.3g}"
    from cellduality.train.monitor import IS_RATIO_KEY, importance_ratio_problem

    if isinstance(logs.get(IS_RATIO_KEY), (int, float)):
        out["is_ratio"] = f"{logs[IS_RATIO_KEY]:.3g}"
        if importance_ratio_problem(logs) is not None:  # the bar says it too, not only the log
            out["WARNING"] = "vLLM weights out of sync"
    return out


def start_log(path: Path, step: int) -> Path | None:
    """Keep in ``path`` the entries of steps up to ``step`` (where training starts: 0 afresh, the
    checkpoint's step when resuming); move the others (and a line a kill cut short) to the first free
    ``train_log.earlier-N.jsonl``, which is returned (None when nothing moved)."""
    if not path.exists():
        return None
    keep: list[str] = []
    moved: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            logged = step + 1
        (keep if logged <= step else moved).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return None
    n = 1
    while (earlier := path.with_name(f"{path.stem}.earlier-{n}{path.suffix}")).exists():
        n += 1
    earlier.write_text("".join(moved), encoding="utf-8")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(keep), encoding="utf-8")
    partial.replace(path)
    return earlier


class CompactProgress(ProgressCallback):
    """``ProgressCallback`` with a short postfix instead of printing every log dictionary."""

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__()
        self.log_file = Path(output_dir) / "train_log.jsonl"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if state.is_world_process_zero:
            earlier = start_log(self.log_file, int(state.global_step))
            if earlier is not None:
                print(f"{self.log_file.name}: an earlier run's entries moved to {earlier.name}")
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any):
        if not state.is_world_process_zero or not logs:
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, **logs}, default=str) + "\n")
        figures = summary(logs)
        if self.training_bar is not None and figures:  # an entry of monitor figures alone keeps the bar's
            self.training_bar.set_postfix(figures, refresh=True)
        elif "train_runtime" in logs:
            print(f"training done in {logs['train_runtime']:.0f} s")


def use_compact_progress(trainer: Any, output_dir: str | Path) -> None:
    """Swap the trainer's progress display for :class:`CompactProgress` (when it shows one at all)."""
    if trainer.args.disable_tqdm:
        return
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress(output_dir))
