"""No collapse passes silently: a GRPO run that drives a task's parseable answers far below where it started
is flagged in the log, the progress bar's line and ``collapse.json`` (and stopped when asked).

A policy can raise a reward by leaving the answer format (an answer that never parses is never
wrong for a dual whose wrong answers score lower than silence), and the test metric is then undefined.
The share of usable answers per task (``format/<task>/parsed``, logged by the format reward) at the
start of GRPO is the SFT checkpoint's own (the first ``baseline_steps`` logged steps, at the warm-up's
small learning rate); a task whose recent share (mean of the last ``window`` logs) falls below
``ratio`` x that start is *collapsed*. Reads the logged metrics only: identical on every rank, no
collective call.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)

COLLAPSE_FILE = "collapse.json"
PARSED_KEY = "format/{task}/parsed"


class CollapseGuard(TrainerCallback):
    """Watches ``format/<task>/parsed`` in the training logs (see the module docstring)."""

    def __init__(
        self,
        output_dir: str | Path,
        ratio: float = 0.5,
        baseline_steps: int = 5,
        window: int = 10,
        stop: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.ratio = ratio
        self.baseline_steps = baseline_steps
        self.window = window
        self.stop = stop
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.collapsed: dict[str, dict[str, Any]] = {}

    def baseline(self, task: str) -> float | None:
        values = [v for _, v in self.history.get(task, [])[: self.baseline_steps]]
        return sum(values) / len(values) if len(values) >= self.baseline_steps else None

    def check(self, task: str, step: int) -> dict[str, Any] | None:
        """The verdict on one task after a log: a collapse record the first time it happens, else None."""
        start = self.baseline(task)
        points = self.history.get(task, [])
        if (
            start is None
            or start <= 0
            or task in self.collapsed
            or len(points) < self.baseline_steps + self.window
        ):
            return None
        recent = sum(v for _, v in points[-self.window :]) / self.window
        if recent >= self.ratio * start:
            return None
        return {
            "task": task,
            "step": step,
            "start": round(start, 4),
            "recent": round(recent, 4),
            "ratio": self.ratio,
        }

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ):
        if not logs:
            return control
        for key, value in logs.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "format" and parts[2] == "parsed" and value is not None:
                self.history.setdefault(parts[1], []).append((int(state.global_step), float(value)))
                found = self.check(parts[1], int(state.global_step))
                if found is None:
                    continue
                self.collapsed[parts[1]] = found
                message = (
                    f"collapse: {parts[1]} answers parse {found['recent']:.0%} of the time over the last "
                    f"{self.window} logs, below {self.ratio:.0%} of the {found['start']:.0%} GRPO started with "
                    f"(step {found['step']}); lower the learning rate, raise the format reward's weight or "
                    "add a KL term (beta)"
                )
                if state.is_world_process_zero:
                    logger.warning(message)
                    print(f"warning: {message}", flush=True)
                    self.output_dir.mkdir(parents=True, exist_ok=True)
                    (self.output_dir / COLLAPSE_FILE).write_text(json.dumps(self.collapsed, indent=1))
                if self.stop:
                    control.should_training_stop = True
        return control


def read_collapse(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The collapses a finished run recorded (empty when none)."""
    path = Path(output_dir) / COLLAPSE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
