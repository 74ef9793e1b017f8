"""The self-supervised dual reward: the policy answers the dual of its own forward answer.

For every completion of the batch, the forward answer is parsed; those that parse get a dual prompt
(``cellduality.tasks.dual``), all dual prompts are answered in ONE call of ``generate`` (the trainer's
policy with its current weights; the training module supplies it), and each dual completion is scored.
Completions that do not parse get 0 without a dual prompt; rows of a task without a dual (neighbourhood
editing) get ``None``, like rows another reward scores. ``generate`` is called exactly once per
reward call, also with an empty prompt list, because under several ranks a generation is a collective
operation: a rank that skipped it would hang the others. The same holds for every reader of
``readers`` (the frozen checkpoint answering the duals of ``dual_frozen_tasks``).

Built from a :class:`~cellduality.rewards.context.RewardContext` (``DualReward.from_context``): the
policy's generation, the readers and the seed come from it; it is label-free, so it is handed the
context without the prepared data.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from cellduality.rewards.base import RowReward, log_per_task, log_zero_std, rows_from_columns
from cellduality.rewards.context import GenerateFn, Messages, RewardContext
from cellduality.tasks.dual import (
    CLASSIFICATION_TASKS,
    GENERATION_TASKS,
    dual_prompt,
    dual_score,
    forward_answer,
    has_dual,
)

logger = logging.getLogger(__name__)


class DualReward(RowReward):
    """Reward = mean dual score over ``num_samples`` dual completions per forward completion."""

    name = "dual"

    def __init__(
        self,
        generate: GenerateFn | None = None,
        vocabulary: Mapping[str, str] | None = None,
        num_samples: int = 1,
        seed: int = 0,
        deterministic: bool = False,
        readers: Mapping[str, GenerateFn] | None = None,
    ) -> None:
        super().__init__(vocabulary)
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.generate = generate
        self.num_samples = num_samples
        self.seed = seed
        # deterministic (greedy) generation answers equal prompts equally: each distinct dual prompt is
        # generated once. In a GRPO group several completions often give the same forward answer (the
        # same label), so this removes most of the dual generation of classification tasks.
        self.deterministic = deterministic
        #: task -> another reader for that task's duals (``dual_frozen_tasks``: the frozen SFT checkpoint
        #: answers those tasks' duals, ``generate`` every other task's). Every reader is
        #: called once per reward call, with an empty list too, so the calls stay equal across ranks.
        self.readers: dict[str, GenerateFn] = dict(readers or {})
        self.last_details: list[dict[str, Any]] = []
        # one entry per call: which tasks this rank saw and how many dual prompts it generated; lets a
        # multi-rank run prove that every rank called ``generate`` the same number of times
        self.history: list[dict[str, Any]] = []
        self._collapsed: set[str] = set()

    @classmethod
    def from_context(
        cls, context: RewardContext, num_samples: int = 1, deterministic: bool = False
    ) -> DualReward:
        """The policy (``context.generate``), the per-task readers and the seed from the run's context."""
        return cls(
            generate=context.generate,
            vocabulary=context.vocabulary,
            num_samples=num_samples,
            seed=context.seed,
            deterministic=deterministic,
            readers=context.readers,
        ).with_vocabularies(context)

    def __call__(self, prompts: Sequence[Any] | None = None, completions: Sequence[Any] = (), **columns: Any):
        if self.generate is None:
            raise RuntimeError(
                "the dual reward needs the policy: build it through cellduality.train (whose reward context "
                "holds the trainer's generation) or give DualReward(generate=...)"
            )
        rows = rows_from_columns(len(completions), columns)
        answers = [
            forward_answer(row, c, self.vocab_for(row)) if has_dual(row.get("task")) else None
            for row, c in zip(rows, completions, strict=True)
        ]
        owners: list[int] = []
        dual_prompts: list[Messages] = []
        for i, (row, answer) in enumerate(zip(rows, answers, strict=True)):
            prompt = dual_prompt(row, answer, seed=self.seed) if answer is not None else None
            if prompt is None:
                continue
            for _ in range(self.num_samples):
                owners.append(i)
                dual_prompts.append(prompt)
        self.history.append(
            {
                "tasks": sorted({str(r.get("task")) for r in rows if r.get("task")}),
                "prompts": len(dual_prompts),
            }
        )
        outputs = self._generate_routed(dual_prompts, [str(rows[i].get("task")) for i in owners])
        scores: dict[int, list[float]] = defaultdict(list)
        self.last_details = []
        for owner, prompt, output in zip(owners, dual_prompts, outputs, strict=True):
            value = dual_score(rows[owner], output, self.vocab_for(rows[owner]))
            scores[owner].append(value)
            self.last_details.append(
                {
                    "index": owner,
                    "task": rows[owner].get("task"),
                    "prompt": prompt,
                    "completion": output,
                    "score": value,
                }
            )
        result = [
            (sum(scores[i]) / len(scores[i]) if scores[i] else 0.0) if has_dual(rows[i].get("task")) else None
            for i in range(len(completions))
        ]
        self._log(rows, result, columns)
        self._diagnose(rows, answers, result, prompts, columns.get("log_metric"))
        return result

    def _diagnose(
        self,
        rows: list[dict[str, Any]],
        answers: list[str | None],
        result: list[float | None],
        prompts: Sequence[Any] | None,
        log_metric: Callable[[str, float], None] | None,
    ) -> None:
        """Label-free diagnostics a person needs to trust a run: per task, the entropy (bits) of the
        predicted-label distribution (``dual/<task>/label_entropy``, a warning when it collapses to one
        class) and the share of GRPO groups whose dual reward has zero variance
        (``dual/<task>/zero_std_groups``: those groups give no gradient)."""
        if log_metric is None:
            return
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(rows):
            if row.get("task"):
                by_task[str(row["task"])].append(i)
        for task, idx in sorted(by_task.items()):
            if task in CLASSIFICATION_TASKS:
                labels = [answers[i] for i in idx if answers[i] is not None]
                if labels:
                    counts = np.unique(labels, return_counts=True)[1] / len(labels)
                    entropy = float(-(counts * np.log2(counts)).sum())
                    log_metric(f"{self.name}/{task}/label_entropy", entropy)
                    n_candidates = len(rows[idx[0]].get("candidates") or [])
                    if entropy == 0.0 and len(labels) >= 8 and n_candidates > 1:
                        self._warn_collapse(task, labels[0])
            if prompts is not None:
                groups: dict[str, list[float]] = defaultdict(list)
                for i in idx:
                    groups[json.dumps(prompts[i], sort_keys=True, default=str)].append(
                        float(result[i] or 0.0)
                    )
                sizes = [v for v in groups.values() if len(v) > 1]
                if sizes:
                    zero = sum(1 for v in sizes if max(v) - min(v) <= 1e-12) / len(sizes)
                    log_metric(f"{self.name}/{task}/zero_std_groups", zero)

    def _warn_collapse(self, task: str, label: str) -> None:
        if task in self._collapsed:
            return
        self._collapsed.add(task)
        logger.warning(
            "%s: every forward answer in this batch is %r: the predicted labels collapsed to one class "
            "(watch dual/%s/label_entropy)",
            task,
            label,
            task,
        )

    def _generate_routed(self, dual_prompts: list[Messages], tasks: list[str]) -> list[str]:
        """Each prompt answered by its task's reader; every reader called exactly once, in a fixed order."""
        assert self.generate is not None
        readers: list[GenerateFn] = [self.generate]
        for reader in self.readers.values():
            if all(reader is not r for r in readers):
                readers.append(reader)
        route = [self.readers.get(task, self.generate) for task in tasks]
        outputs: list[str] = [""] * len(dual_prompts)
        generated = 0
        for reader in readers:
            idx = [i for i, r in enumerate(route) if r is reader]
            answers, count = self._generate([dual_prompts[i] for i in idx], reader)
            generated += count
            for i, answer in zip(idx, answers, strict=True):
                outputs[i] = answer
        self.history[-1]["generated"] = generated
        return outputs

    def _generate(self, dual_prompts: list[Messages], generate: GenerateFn) -> tuple[list[str], int]:
        """One call of ``generate`` (always, even with no prompt), distinct prompts only if deterministic;
        the answers, and how many prompts were generated."""
        if self.deterministic:
            keys = [json.dumps(p, sort_keys=True) for p in dual_prompts]
            first: dict[str, Messages] = {}
            for key, prompt in zip(keys, dual_prompts, strict=True):
                first.setdefault(key, prompt)
            unique = list(first)
            answers = generate(list(first.values()))
            if len(answers) != len(unique):
                raise RuntimeError(f"generate returned {len(answers)} completions for {len(unique)} prompts")
            by_key = dict(zip(unique, answers, strict=True))
            return [by_key[k] for k in keys], len(unique)
        outputs = generate(dual_prompts)
        if len(outputs) != len(dual_prompts):
            raise RuntimeError(
                f"generate returned {len(outputs)} completions for {len(dual_prompts)} prompts"
            )
        return outputs, len(dual_prompts)

    def _log(
        self, rows: list[dict[str, Any]], result: list[float | None], columns: Mapping[str, Any]
    ) -> None:
        """Per-task dual metrics, and the dual completions next to the forward ones in TRL's table."""
        log_metric = columns.get("log_metric")
        log_per_task(self.name, rows, result, log_metric, "reward")
        log_zero_std(self.name, rows, result, log_metric)
        classification = [
            r if row.get("task") in CLASSIFICATION_TASKS else None
            for row, r in zip(rows, result, strict=True)
        ]
        generation = [
            r if row.get("task") in GENERATION_TASKS else None for row, r in zip(rows, result, strict=True)
        ]
        log_per_task(self.name, rows, classification, log_metric, "rwjs")
        log_per_task(self.name, rows, generation, log_metric, "accuracy")
        log_extra = columns.get("log_extra")
        if log_extra is not None:
            first: dict[int, str] = {}
            for detail in self.last_details:
                first.setdefault(detail["index"], str(detail["completion"]))
            log_extra("dual_completion", [first.get(i, "") for i in range(len(rows))])

    def score(self, row: Mapping[str, Any], completion: Any) -> float | None:  # pragma: no cover
        raise TypeError("DualReward scores a whole batch at once; call it with TRL's signature")
