"""Is a label-free run going the right way? A labelled monitor split, checked every N steps.

A self-supervised run optimises the dual reward; whether that reward still agrees with the truth is
what a person needs to see while it trains. ``DualMonitor`` holds out a few *training* rows per task
(they never reach the training rows), and every ``every`` steps samples G forward answers per monitor
prompt with the live policy, scores them with the run's own dual reward (fed no label column) and
with the oracle, and logs per task:

- ``monitor/<task>/spearman``: mean within-group Spearman correlation of dual and oracle rewards;
- ``monitor/<task>/dual_gap``: dual reward of the better minus the worse answers inside mixed groups;
- ``monitor/<task>/oracle``: the oracle reward of the sampled answers (how good the policy is).

The figures are logged through the trainer's public ``log`` (transformers' ``Trainer.log``, what every
reporter, the progress bar and ``log_history`` read), as an entry of their own at the step they were
measured. TRL hands its public ``log_metric`` to reward functions only, and GRPO's own ``log`` override
would fold in and reset the running averages of the step's rewards, so the base ``Trainer.log`` is
called; nothing is written into TRL's private ``_metrics``.

Labels stay out of the trainer: the monitor rows are written to ``<output_dir>/monitor`` when the run
starts, and the callback keeps only that path. At each check the rows are read from disk, used, and
dropped; no reward ever receives them. Every rank runs the same checks on the same rows, so the
generation calls (collective under ZeRO-3 or vLLM) happen the same number of times everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

MONITOR_DIR = "monitor"
#: TRL's mean importance-sampling ratio (trainer policy / vLLM sampler, per token or sequence)
IS_RATIO_KEY = "sampling/importance_sampling_ratio/mean"
#: outside this range the vLLM engine is not generating with the trainer's weights
IS_RATIO_RANGE = (0.5, 2.0)

logger = logging.getLogger(__name__)


def importance_ratio_problem(logs: Mapping[str, Any]) -> str | None:
    """One line when a log's mean importance-sampling ratio leaves ``IS_RATIO_RANGE``, else ``None``.

    With vLLM the rollouts are sampled by the engine and scored by the trainer; the ratio of the two
    probabilities stays near 1 while both hold the same weights. A ratio far from 1 means the engine
    holds other weights: sleep mode without a re-push (huggingface/trl#5312 logged a mean of 0.03),
    or a resumed run whose engine still holds the starting checkpoint.
    """
    value = logs.get(IS_RATIO_KEY)
    if not isinstance(value, (int, float)) or value != value:  # absent or NaN
        return None
    low, high = IS_RATIO_RANGE
    if low <= value <= high:
        return None
    return (
        f"importance-sampling ratio {value:.3g} is outside [{low:g}, {high:g}]: vLLM is probably generating "
        "with weights other than the trainer's (weights not pushed after sleep mode or after a resume)"
    )


class ImportanceRatioWatch(TrainerCallback):
    """Warn, in the log, whenever TRL's logged importance-sampling ratio says vLLM is out of sync."""

    def __init__(self) -> None:
        self.warnings: list[tuple[int, str]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any):
        problem = importance_ratio_problem(logs or {})
        if problem is not None and state.is_world_process_zero:
            self.warnings.append((state.global_step, problem))
            logger.warning("step %d: %s", state.global_step, problem)
        return control


def split_monitor_rows(train: Any, per_task: int, seed: int) -> tuple[Any, Any]:
    """(training rows without the monitor rows, the monitor rows): ``per_task`` seeded rows per task."""
    rng = np.random.default_rng([seed, 7])
    tasks = np.asarray(train["task"])
    picked: list[int] = []
    from cellduality.tasks.dual import has_dual

    for task in dict.fromkeys(tasks.tolist()):
        if not has_dual(task):  # nothing to monitor (neighbourhood editing has no dual): all rows train
            continue
        idx = np.flatnonzero(tasks == task)
        if idx.size > per_task:  # a task with too few rows keeps all of them for training
            picked.extend(rng.choice(idx, size=per_task, replace=False).tolist())
    keep = sorted(set(range(len(train))) - set(picked))
    return train.select(keep), train.select(sorted(picked))


def publish(trainer: Any, figures: Mapping[str, float]) -> None:
    """Log ``figures`` as an entry of their own through the public ``transformers.Trainer.log``.

    Not ``trainer.log``: ``GRPOTrainer.log`` averages and clears the step's reward metrics into whatever
    it logs, so the trainer's own entry at a logging step would lose them.
    """
    from transformers import Trainer

    if figures:
        Trainer.log(trainer, dict(figures))


class DualMonitor(TrainerCallback):
    """Agreement of the dual reward with the truth on held-out labelled rows, every ``every`` steps."""

    def __init__(
        self,
        folder: str | Path,
        dual_reward: Callable[..., list[float | None]],
        sample: Callable[[list[Any]], list[str]],
        vocabulary: Mapping[str, str],
        group_size: int = 4,
        every: int = 10,
    ) -> None:
        self.folder = str(folder)  # the path only: the rows are read at each check and dropped
        self.dual_reward = dual_reward
        self.sample = sample
        self.vocabulary = dict(vocabulary)
        self.group_size = group_size
        self.every = every
        # the trainer whose public ``log`` receives the figures (set once the trainer is built)
        self.trainer: Any = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        if self.every > 0 and state.global_step % self.every == 0:
            figures = self.check()  # on every rank: its generation is collective
            if self.trainer is None:
                raise RuntimeError("DualMonitor.trainer is not set: give it the trainer once it is built")
            publish(self.trainer, figures)
        return control

    def check(self) -> dict[str, float]:
        """One round of the monitor: per task Spearman, dual gap and oracle reward."""
        from datasets import load_from_disk

        from cellduality.eval.dual_check import group_view
        from cellduality.rewards.oracle import Oracle

        rows = load_from_disk(self.folder).to_list()
        g = self.group_size
        prompts = [r["prompt"] for r in rows for _ in range(g)]
        completions = self.sample(prompts)  # one generation call, the same on every rank
        columns = {
            k: [r[k] for r in rows for _ in range(g)] for k in rows[0] if k not in ("answer", "cell_id")
        }
        dual = np.asarray(self.dual_reward(prompts=prompts, completions=completions, **columns), dtype=float)
        labelled = {
            k: [r[k] for r in rows for _ in range(g)] for k in ("task", "answer", "candidates", "n_genes")
        }
        oracle = np.asarray(Oracle(self.vocabulary)(completions=completions, **labelled), dtype=float)
        tasks = np.asarray([r["task"] for r in rows])
        out: dict[str, float] = {}
        for task in dict.fromkeys(tasks.tolist()):
            m = tasks == task
            d = dual.reshape(len(rows), g)[m]
            o = oracle.reshape(len(rows), g)[m]
            view = group_view(d, o, np.ones(d.size, dtype=bool), task)
            if view.spearman is not None:
                out[f"monitor/{task}/spearman"] = view.spearman
            if view.dual_of_better is not None and view.dual_of_worse is not None:
                out[f"monitor/{task}/dual_gap"] = view.dual_of_better - view.dual_of_worse
            out[f"monitor/{task}/oracle"] = float(o.mean())
        return out
