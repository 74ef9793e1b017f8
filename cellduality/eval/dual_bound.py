"""What the data allow a dual reward to see: the dual answered by a reference reader fitted on labels.

``cellduality dual-check`` measures the *policy's* dual reward for right and wrong forward answers. When
that gap is zero, a user needs to know whether the policy has not learned to read the answer or whether
the data cannot tell right from wrong at all (no policy could). This module answers the second question:
the same right and wrong forward answers are scored by a reader that is fitted, with labels, on the
training split, and so is about as good as a small model trained on those data can be:

- reconstruction duals (generation, perturbation): a logistic regression on which genes a training
  cell's sentence holds, predicting its condition (per context; controls included for perturbation),
  names the condition among the row's candidates;
- in-painting duals (annotation, drug sensitivity): the offline teacher's in-painting from the label's
  training profile (the genes that label's training cells express most, minus the visible ones).

Labels are read here, by the check, never by a reward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS, control_cell_genes, dual_score

Row = Mapping[str, Any]


class ReferenceReader:
    """The dual of one prepared folder answered from its training split (see the module docstring)."""

    def __init__(self, prepared: Any, seed: int = 0) -> None:
        self.prepared = prepared
        self.seed = seed
        self._classifiers: dict[tuple[str, str], Any] = {}
        self._teacher: Any = None

    def score(self, row: Row, answer: str | None) -> float:
        """The dual reward the reference reader earns for ``row`` given the forward ``answer``."""
        if answer is None:
            return float("nan")
        task = str(row["task"])
        if task in CLASSIFICATION_TASKS:
            teacher = self._offline_teacher()
            return dual_score(row, teacher.answer(row, dual_answer=answer))
        if task in GENERATION_TASKS:
            model, index = self._classifier(str(row["dataset"]), task)
            x = _presence([answer.split()], index)
            proba = model.predict_proba(x)[0]
            classes = {c: i for i, c in enumerate(model.classes_)}
            ctx = str(row.get("context", "")) if task == "perturbation" else ""
            scores = [
                proba[classes[_key(c, ctx)]] if _key(c, ctx) in classes else -1.0 for c in row["candidates"]
            ]
            named = str(row["candidates"][int(np.argmax(scores))]) if len(scores) else None
            return 1.0 if named is not None and named == str(row.get("condition", "")) else 0.0
        return float("nan")

    def _offline_teacher(self) -> Any:
        if self._teacher is None:
            from cellduality.teacher.offline import OfflineTeacher

            self._teacher = OfflineTeacher(self.prepared, concise=True)
        return self._teacher

    def _classifier(self, dataset: str, task: str) -> tuple[Any, dict[str, int]]:
        if (dataset, task) in self._classifiers:
            return self._classifiers[(dataset, task)]
        from sklearn.linear_model import LogisticRegression

        from cellduality.tasks.build import part_meta

        train = self.prepared.datasets["train"]
        mask = (np.asarray(train["dataset"]) == dataset) & (np.asarray(train["task"]) == task)
        rows = train.select(np.flatnonzero(mask)).to_list()
        sentences = [str(r["answer"]).split() for r in rows]
        keys = [
            _key(str(r["condition"]), str(r.get("context", "")) if task == "perturbation" else "")
            for r in rows
        ]
        if task == "perturbation":  # the control cells the rows were paired with, named by the control value
            control = str(part_meta(dict(self.prepared.meta), dataset)["columns"]["control_value"])
            seen: set[tuple[str, ...]] = set()  # each control cell once: rows share a few control cells
            for r in rows:
                cell = tuple(control_cell_genes(r))
                if cell not in seen:
                    seen.add(cell)
                    sentences.append(list(cell))
                    keys.append(_key(control, str(r.get("context", ""))))
        genes = sorted({g.casefold() for s in sentences for g in s})
        index = {g: i for i, g in enumerate(genes)}
        # balanced: a dual's candidates are equally likely a priori; the training split's class sizes
        # (one control class against many perturbations) must not decide the name
        model = LogisticRegression(max_iter=2000, C=0.5, class_weight="balanced", random_state=self.seed)
        model.fit(_presence(sentences, index), keys)
        self._classifiers[(dataset, task)] = (model, index)
        return model, index


def _key(condition: str, context: str) -> str:
    return f"{condition}\x1f{context}"


def _presence(sentences: Sequence[Sequence[str]], index: Mapping[str, int]) -> np.ndarray:
    x = np.zeros((len(sentences), max(1, len(index))))
    for i, sentence in enumerate(sentences):
        for g in sentence:
            j = index.get(g.casefold())
            if j is not None:
                x[i, j] = 1.0
    return x
