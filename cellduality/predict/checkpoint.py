"""What a trained checkpoint knows about its data: read from the run metadata saved next to it.

``cellduality.train.sft`` and ``.grpo`` write ``cellduality_run.json`` beside the weights
(:mod:`cellduality.modeling.checkpoint`): the prepared meta of every dataset the model was trained on
(gene vocabulary, rank -> expression fit, columns, sentence length, candidate labels). Prediction takes every setting from there, so a user never repeats
one, and a checkpoint without it is refused: guessing the sentence length or the candidates would give
prompts the model never saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellduality.data.schema import Columns, DataError
from cellduality.modeling.checkpoint import RUN_META, run_meta_path
from cellduality.sentences import RankExpressionFit
from cellduality.tasks.common import TaskConfig


def find_run_meta(model: str | Path) -> Path:
    """The run metadata of ``model`` (found by :func:`cellduality.modeling.checkpoint.run_meta_path`: in
    its folder, or in the run's folder above a ``merged/`` or ``checkpoint-N`` folder); refused without."""
    folder = Path(model)
    if not folder.exists():
        raise DataError(f"no such checkpoint folder: {folder}")
    if not folder.is_dir():
        raise DataError(f"--model {folder} is a file; give the model's folder")
    found = run_meta_path(folder)
    if found is not None:
        return found
    raise DataError(
        f"{folder} has no run metadata ({RUN_META}): predict needs a checkpoint written by "
        "`python -m cellduality.train.sft` or `.grpo` (or the demo), which records the genes, sentence length "
        "and candidate labels the model was trained with"
    )


@dataclass
class TrainedDataset:
    """One dataset a checkpoint was trained on, as its prepared meta describes it."""

    name: str
    meta: dict[str, Any]

    @property
    def tasks(self) -> list[str]:
        return list(self.meta.get("tasks") or [])

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.meta.get("genes") or []]

    @property
    def fit(self) -> RankExpressionFit:
        return RankExpressionFit.from_dict(self.meta["fit"])

    @property
    def config(self) -> TaskConfig:
        cfg = dict(self.meta.get("config") or {})
        known = TaskConfig.__dataclass_fields__
        return TaskConfig(**{k: v for k, v in cfg.items() if k in known})

    def gene_scores(self, sentences: Sequence[Sequence[str]]) -> dict[str, float] | None:
        """Which genes the in-painting dual hides, as in training: the trained dataset's presence scores
        (recorded in its meta); for a meta that predates them, the same label-free score on ``sentences``
        when the rule was ``informative``, and ``None`` (random genes) for the ``random`` rule."""
        from cellduality.tasks.common import presence_scores

        info = self.meta.get("hidden_genes") or {}
        if info.get("scores"):
            return {str(g): float(v) for g, v in info["scores"].items()}
        if info.get("rule", "random") == "random":
            return None
        top_k = self.config.top_k
        return presence_scores([s[:top_k] for s in sentences])

    @property
    def columns(self) -> Columns:
        cols = dict(self.meta.get("columns") or {})
        cols["context"] = tuple(cols.get("context") or ())
        known = Columns.__dataclass_fields__
        return Columns(**{k: v for k, v in cols.items() if k in known})

    def labels(self, task: str) -> Any:
        """The candidate labels of ``task`` (see :mod:`cellduality.tasks.labels`), from the meta or, for a
        checkpoint trained before they were recorded, recomputed from the dataset the meta names."""
        stored = (self.meta.get("labels") or {}).get(task)
        if stored is not None:
            return stored
        from cellduality.tasks.labels import labels_from_source

        self.meta.setdefault("labels", {}).update(labels_from_source(self.meta))
        return self.meta["labels"].get(task)


@dataclass
class Checkpoint:
    """A model folder and the datasets its run metadata describes."""

    path: Path
    run: dict[str, Any]
    datasets: dict[str, TrainedDataset] = field(default_factory=dict)

    @classmethod
    def load(cls, model: str | Path) -> Checkpoint:
        meta_path = find_run_meta(model)
        try:
            run = json.loads(meta_path.read_text())
            prepared = run["prepared"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{meta_path} is not readable run metadata ({exc})") from exc
        parts: Mapping[str, Any] = prepared.get("parts") or {
            str(prepared.get("dataset", "dataset")): prepared
        }
        datasets = {str(name): TrainedDataset(str(name), dict(meta)) for name, meta in parts.items()}
        return cls(Path(model), run, datasets)

    def dataset_for(self, task: str, name: str | None = None) -> TrainedDataset:
        """The trained dataset that supplies ``task``'s settings: ``name``, or the only one with the task."""
        if name is not None:
            if name not in self.datasets:
                raise DataError(
                    f"the checkpoint was not trained on {name!r}; it was trained on: {', '.join(self.datasets)}"
                )
            found = self.datasets[name]
            if task not in found.tasks:
                raise DataError(
                    f"{name!r} has no {task} examples in this checkpoint (its tasks: {', '.join(found.tasks)})"
                )
            return found
        having = [d for d in self.datasets.values() if task in d.tasks]
        if not having:
            trained = {n: d.tasks for n, d in self.datasets.items()}
            raise DataError(f"the checkpoint was not trained on task {task!r} (it was trained on {trained})")
        if len(having) > 1:
            raise DataError(
                f"the checkpoint learnt {task} on several datasets ({', '.join(d.name for d in having)}): "
                "choose one with --trained-on NAME"
            )
        return having[0]

    @property
    def max_new_tokens(self) -> int | None:
        """The completion length the run trained with, when it recorded one."""
        value = (self.run.get("generation") or {}).get("max_new_tokens")
        return int(value) if value else None


def match_condition(value: str, known: Sequence[str]) -> str | None:
    """The known label ``value`` names (case and spacing ignored, as answers are matched)."""
    from cellduality.parsing import match_label

    return match_label(value, known)


__all__ = ["Checkpoint", "TrainedDataset", "find_run_meta", "match_condition"]
