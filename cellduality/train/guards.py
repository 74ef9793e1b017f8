"""Stop a GRPO run that cannot learn, with the reason, instead of letting it look like training.

GRPO learns from the differences between the rewards of one prompt's completions (the advantage is
the reward minus its group's mean). When every group's completions get the same reward, every
advantage is 0, the loss is 0 and nothing changes: a run from an untrained model, whose completions
never parse (clipped at the length limit, reward -0.3 or 0 at every step), does exactly that, for
hours, and ends with ``saved to``.

TRL 1.16 logs ``frac_reward_zero_std`` at every logging step: the share of groups whose total reward
has zero standard deviation, averaged over the generation batches since the last log. It is computed
on the rewards gathered from every process, so every rank sees the same value and stops at the same
step. :class:`ZeroVarianceStop` watches it: when it has been exactly 1 in every log of the first
``steps`` optimiser steps of this run, it stops the training loop and, when the trainer ends it (after
its progress bar is closed), raises :class:`NoLearningSignal`, a ``DataError``, which the
``cellduality grpo`` entry point prints as one line (exit 2). The final model is not saved (a
``checkpoint-N`` the save schedule wrote at that step stays, as any checkpoint does). One log with any
variance disarms it for the rest of the run: a run that once had a signal is not second-guessed.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from cellduality.data.schema import DataError

__all__ = ["NoLearningSignal", "ZeroVarianceStop"]

#: the metric TRL logs (``GRPOTrainer._generate_and_score_completions``)
ZERO_STD_KEY = "frac_reward_zero_std"


class NoLearningSignal(DataError):
    """Every GRPO group had the same reward for the first N steps: the run cannot learn as set up."""


class ZeroVarianceStop(TrainerCallback):
    """Raise :class:`NoLearningSignal` after ``steps`` steps in which no group's reward varied.

    ``steps <= 0`` turns the check off. ``model_hint`` names the model in the message. A run shorter than
    ``steps`` is never judged (it ends as it did before), so short smoke runs are unaffected.
    """

    def __init__(self, steps: int, model_hint: str = "", sft_recipe: str = "sft.yaml") -> None:
        self.steps = int(steps)
        self.model_hint = model_hint
        self.sft_recipe = sft_recipe
        self.start_step: int | None = None
        self.signal = False
        self.rewards: list[float] = []
        self.clipped: list[float] = []
        self.stopped: str | None = None  # the diagnosis, once the run is stopped

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_step = state.global_step  # a resumed run is judged on the steps it trains itself

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if self.steps <= 0 or self.signal or not logs or ZERO_STD_KEY not in logs:
            return
        share = logs[ZERO_STD_KEY]
        if share is None or (isinstance(share, float) and math.isnan(share)) or share < 1.0 - 1e-9:
            self.signal = True
            return
        for key, into in (("reward", self.rewards), ("completions/clipped_ratio", self.clipped)):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                into.append(float(value))
        start = self.start_step if self.start_step is not None else 0
        if state.global_step - start >= self.steps:
            # stop after this step; the error is raised once the trainer has closed its progress bar
            self.stopped = self.diagnosis(state.global_step - start)
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stopped is not None:
            raise NoLearningSignal(self.stopped)

    def diagnosis(self, steps: int) -> str:
        """The one line: what was seen, why it means no learning, what to do."""
        seen = []
        if self.rewards:
            low, high = min(self.rewards), max(self.rewards)
            seen.append(
                f"reward {low:.2f}"
                if math.isclose(low, high, abs_tol=5e-3)
                else f"reward {low:.2f}..{high:.2f}"
            )
        if self.clipped and min(self.clipped) >= 0.99:
            seen.append("every completion clipped at max_completion_length")
        what = f" ({', '.join(seen)})" if seen else ""
        model = f" {self.model_hint}" if self.model_hint else ""
        out = "outputs/tiny-cpu/" + self.sft_recipe.removesuffix(".yaml")
        return (
            f"no learning signal: for {steps} steps every group of completions got the same reward{what}, so "
            f"every GRPO advantage and the loss are 0; the model{model} most likely writes no completion that "
            f"parses: start GRPO from an SFT checkpoint of the same tasks (e.g. cellduality sft --config "
            f"recipes/tiny-cpu/{self.sft_recipe}, then --model_name_or_path {out}), or set "
            "zero_variance_stop_steps: 0 to train anyway"
        )

    @classmethod
    def for_run(cls, cd_args: Any, model_args: Any) -> ZeroVarianceStop:
        """The guard of one GRPO run: its N, its model, and the SFT recipe of its tasks for the message."""
        only_neighbourhood = list(cd_args.tasks or []) == ["neighbourhood"]
        recipe = "sft_neighbourhood.yaml" if only_neighbourhood else "sft.yaml"
        return cls(cd_args.zero_variance_stop_steps, str(model_args.model_name_or_path), recipe)
