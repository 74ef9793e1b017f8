"""The offline teacher: grounded rationales computed from the training split, no network needed.

It answers every forward and dual prompt of the suite from statistics of the training data alone:

- cell types and drug responses: marker genes per class from scanpy's ``rank_genes_groups`` (t-test)
  on expression reconstructed from the training cells' sentences, and class mean profiles; a cell is
  classified by correlation with the class profiles, and the rationale names the markers it carries;
- generation and in-painting: the class profile's most expressed genes (leaving out visible ones);
- perturbations: the signature of each perturbation (mean perturbed minus mean control expression in
  the same context: the top up- and down-regulated genes), applied to the control cell and re-ranked;
  the dual names the perturbation whose signature best matches the observed change.

Its traces go through the same quality filters as an LLM's: the teacher is a reasoned baseline, not
an oracle, and it is wrong where the data are ambiguous; those traces are rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellduality.sentences import RankExpressionFit, sentences_to_matrix
from cellduality.tasks.build import PreparedTasks, part_meta
from cellduality.tasks.dual import CLASSIFICATION_TASKS

N_MARKERS = 6

#: The fixed words of the rationales below, so a tiny model's tokenizer built before the SFT data
#: exists can still spell every trace (``cellduality.train.common.texts_of_tasks`` adds it).
RATIONALE_WORDS = (
    "markers none so up: down: highly expressed in but not visible the change matches no signature "
    "The cell's top genes are It carries markers of No single marker stands out, but its overall "
    "profile is closest to Its profile matches (r = ) better than , whose are absent. So the cell is "
    "A typical cell expresses most. Its should rank high. I list the genes with the highest mean "
    "expression in cells. is not a class I know. genes are visible; are hidden. Among the express "
    "most, ones not visible are so they are likeliest hidden genes, in that order. I have no signature "
    "for ; the control cell stays as it is. In training cells, raises and lowers relative to control "
    "cells of the same context. Applying that change to this control cell and re-ranking gives the "
    "perturbed cell. The change from the control cell matches no known perturbation signature. The "
    "perturbed cell differs from the control cell in a way that agrees best with the signature of "
    "(cosine ) among the candidates."
    " the cell matches is unchanged from the control gained: lost: ;"
)


def perturbation_rationale(control: Sequence[str], cell: Sequence[str], answer: str, n: int = 4) -> str:
    """The concise trace of naming a perturbation: what the perturbed cell gained and lost relative to
    the control cell, then the name.

    Why: a tiny model does not learn to name a perturbation from two whole sentences (measured: it
    answered by the prior, 88% of right and wrong cells named alike); written out first, the genes that
    changed are copied from the prompt (what attention does easily) and the name follows from them.
    """
    seen, shown = {g.casefold() for g in control}, {g.casefold() for g in cell}
    gained = [g for g in cell if g.casefold() not in seen][:n]
    lost = [g for g in control if g.casefold() not in shown][:n]
    if not gained and not lost:
        return "gained: none; the cell is unchanged from the control"
    return (
        f"gained: {' '.join(gained) or 'none'}; lost: {' '.join(lost) or 'none'}; the change matches {answer}"
    )


def completion(think: str, answer: str) -> str:
    """A completion in the contract's format."""
    return f"<think>{think}</think><answer>{answer}</answer>"


@dataclass
class _Classes:
    """Mean expression profile and marker genes of each class of one labelling."""

    names: list[str]
    profiles: np.ndarray  # classes x genes
    markers: dict[str, list[str]] = field(default_factory=dict)

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Correlation of one expression vector with every class profile."""
        centred = self.profiles - self.profiles.mean(axis=1, keepdims=True)
        xc = x - x.mean()
        denom = np.linalg.norm(centred, axis=1) * (np.linalg.norm(xc) or 1.0)
        return (centred @ xc) / np.where(denom > 0, denom, 1.0)


@dataclass
class _Part:
    """What the teacher knows about one dataset of the prepared data."""

    genes: list[str]
    fit: RankExpressionFit
    index: dict[str, int]
    classes: dict[str, _Classes] = field(default_factory=dict)  # per task
    signatures: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)  # (context, perturbation)

    def expr(self, sentences: Sequence[Sequence[str]]) -> np.ndarray:
        return sentences_to_matrix(sentences, self.genes, self.fit)


def _markers(x: np.ndarray, labels: Sequence[str], genes: Sequence[str], n: int) -> dict[str, list[str]]:
    """Top ``n`` marker genes per label: scanpy's rank_genes_groups (t-test) on the given expression."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    counts = pd.Series(labels).value_counts()
    keep = np.isin(np.asarray(labels), counts[counts >= 2].index)
    if len(counts[counts >= 2]) < 2:
        return {}
    adata = ad.AnnData(
        X=x[keep].astype(np.float32),
        obs=pd.DataFrame({"label": pd.Categorical(np.asarray(labels)[keep])}),
        var=pd.DataFrame(index=pd.Index(list(genes)).astype(str)),
    )
    adata.var_names_make_unique()
    sc.tl.rank_genes_groups(adata, "label", method="t-test", n_genes=n)
    names = adata.uns["rank_genes_groups"]["names"]
    return {g: [str(v) for v in names[g]] for g in names.dtype.names}


class OfflineTeacher:
    """Answers prompts of the task suite with rationales grounded in the training split."""

    name = "offline"

    def __init__(self, prepared: PreparedTasks, n_markers: int = N_MARKERS, concise: bool = False) -> None:
        # concise: short, formulaic rationales (gene lists, no numbers) that a tiny model can learn to
        # write in a few CPU minutes; the demo uses them. Full rationales read like an expert's notes.
        self.n_markers = n_markers
        self.concise = concise
        self.parts: dict[str, _Part] = {}
        train = prepared.datasets["train"]
        datasets = np.asarray(train["dataset"])
        tasks = np.asarray(train["task"])
        for name in dict.fromkeys(datasets.tolist()):
            meta = part_meta(prepared.meta, name)
            part = _Part(
                genes=list(meta["genes"]),
                fit=RankExpressionFit.from_dict(meta["fit"]),
                index={g.casefold(): i for i, g in enumerate(meta["genes"])},
            )
            for task in dict.fromkeys(tasks[datasets == name].tolist()):
                rows = train.select(np.flatnonzero((datasets == name) & (tasks == task)))
                if task == "perturbation":
                    self._fit_perturbations(part, rows)
                elif task != "neighbourhood":  # edits are answered from the row itself (_edit)
                    self._fit_classes(part, task, rows)
            self.parts[name] = part

    def _fit_classes(self, part: _Part, task: str, rows: Any) -> None:
        sentences = (
            rows["cell_genes"] if task in CLASSIFICATION_TASKS else [a.split() for a in rows["answer"]]
        )
        labels = rows["answer"] if task in CLASSIFICATION_TASKS else rows["condition"]
        x = part.expr(sentences)
        names = sorted(set(labels))
        lab = np.asarray(labels)
        profiles = np.stack([x[lab == c].mean(axis=0) for c in names])
        part.classes[task] = _Classes(names, profiles, _markers(x, labels, part.genes, self.n_markers))

    def _fit_perturbations(self, part: _Part, rows: Any) -> None:
        perturbed = part.expr([a.split() for a in rows["answer"]])
        controls = part.expr(rows["cell_genes"])
        context = np.asarray(rows["context"])
        condition = np.asarray(rows["condition"])
        for ctx in np.unique(context):
            base = controls[context == ctx].mean(axis=0)
            for cond in np.unique(condition[context == ctx]):
                m = (context == ctx) & (condition == cond)
                part.signatures[(str(ctx), str(cond))] = perturbed[m].mean(axis=0) - base

    # ----------------------------------------------------------------------------------------- answers

    def answer(self, row: Mapping[str, Any], dual_answer: str | None = None) -> str:
        """Completion for a forward example (``dual_answer=None``) or for its dual prompt.

        ``dual_answer`` is the forward answer the dual prompt was built from (the ground truth when
        making dual SFT examples).
        """
        part = self.parts.get(str(row.get("dataset")))
        if part is None:
            raise KeyError(f"the offline teacher has no training data for dataset {row.get('dataset')!r}")
        task = row["task"]
        if task == "neighbourhood":
            if dual_answer is not None:
                raise ValueError("the neighbourhood task has no dual question")
            return self._edit(row)
        if dual_answer is None:
            if task in CLASSIFICATION_TASKS:
                return self._classify(part, task, list(row["cell_genes"]), list(row["candidates"]))
            if task == "generation":
                return self._generate(part, row)
            return self._perturb(part, row)
        if task in CLASSIFICATION_TASKS:
            return self._inpaint(part, task, row, dual_answer)
        if task == "generation":
            return self._classify(part, "generation", dual_answer.split(), list(row["candidates"]))
        return self._name_perturbation(part, row, dual_answer.split())

    def _edit(self, row: Mapping[str, Any]) -> str:
        """A neighbourhood edit: the row's reference edit, made at prepare time from the *training* deltas.

        (Greedy moves that raise the Pearson delta on the target's training response; held-out rows
        have no reference and are never asked: the teacher sees the train split only.) The concise
        rationale uses only words every neighbourhood prompt has, so a tiny model's tokenizer spells it.
        """
        from cellduality.tasks.neighbourhood import parse_edit

        answer = str(row.get("answer") or "")
        edit = parse_edit(completion("", answer))
        if edit is None:
            raise ValueError(f"no reference edit for {row.get('condition')!r}")
        adds, removes = ", ".join(edit.additions) or "none", ", ".join(edit.removals) or "none"
        if self.concise:
            return completion(f"add {adds}; remove {removes}", answer)
        think = (
            f"Among the training perturbations of {row.get('context') or 'this context'}, the responses of "
            f"{adds} resemble the response to {row['condition_text']} more than the neighbourhood's mean does, "
            f"while {removes} pull the mean away from it. So I add the first and remove the second."
        )
        return completion(think, answer)

    def _classify(self, part: _Part, task: str, sentence: list[str], candidates: list[str]) -> str:
        classes = part.classes[task]
        scores = classes.scores(part.expr([sentence])[0])
        allowed = [i for i, c in enumerate(classes.names) if c in candidates]
        best = max(allowed, key=lambda i: scores[i])
        label = classes.names[best]
        present = {g.casefold(): r for r, g in enumerate(sentence, start=1)}
        if self.concise:
            shown = [g for g in classes.markers.get(label, []) if g.casefold() in present][:3]
            return completion(f"markers {' '.join(shown) or 'none'} so {label}", label)
        carried = [
            f"{g} (rank {present[g.casefold()]})"
            for g in classes.markers.get(label, [])
            if g.casefold() in present
        ]
        runner = max((i for i in allowed if i != best), key=lambda i: scores[i], default=None)
        think = f"The cell's top genes are {', '.join(sentence[:5])}. "
        if carried:
            think += f"It carries markers of {label}: {', '.join(carried[:4])}. "
        else:
            think += f"No single marker stands out, but its overall profile is closest to {label}. "
        if runner is not None:
            other = classes.names[runner]
            missing = [g for g in classes.markers.get(other, []) if g.casefold() not in present][:3]
            think += f"Its profile matches {label} (r = {scores[best]:.2f}) better than {other} (r = {scores[runner]:.2f})"
            think += f", whose markers {', '.join(missing)} are absent. " if missing else ". "
        think += f"So the cell is {label}."
        return completion(think, label)

    def _generate(self, part: _Part, row: Mapping[str, Any]) -> str:
        classes = part.classes["generation"]
        label = str(row["condition"])
        profile = classes.profiles[classes.names.index(label)]
        n = int(row["n_genes"])
        genes = [part.genes[j] for j in np.argsort(-profile, kind="stable")[:n] if profile[j] > 0]
        markers = classes.markers.get(label, [])[:4]
        if self.concise:
            return completion(f"{label} markers {' '.join(markers[:3])}", " ".join(genes))
        think = (
            f"A typical {label} cell expresses {', '.join(genes[:4])} most."
            + (f" Its markers {', '.join(markers)} should rank high." if markers else "")
            + f" I list the {len(genes)} genes with the highest mean expression in {label} cells."
        )
        return completion(think, " ".join(genes))

    def _inpaint(self, part: _Part, task: str, row: Mapping[str, Any], label: str) -> str:
        classes = part.classes[task]
        if label not in classes.names:
            return completion(f"{label} is not a class I know.", "")
        profile = classes.profiles[classes.names.index(label)]
        visible = {g.casefold() for g in row["visible_genes"]}
        n = len(row["hidden_genes"])
        order = [
            j
            for j in np.argsort(-profile, kind="stable")
            if part.genes[j].casefold() not in visible and profile[j] > 0
        ]
        genes = [part.genes[j] for j in order[:n]]
        if self.concise:
            return completion(f"highly expressed in {label} but not visible", " ".join(genes))
        think = (
            f"{len(visible)} genes are visible; {n} are hidden. Among the genes {label} cells express most, "
            f"the ones not visible are {', '.join(genes[:4])}, so they are the likeliest hidden genes, in "
            "that order."
        )
        return completion(think, " ".join(genes))

    def _perturb(self, part: _Part, row: Mapping[str, Any]) -> str:
        ctx, cond = str(row["context"]), str(row["condition"])
        signature = part.signatures.get((ctx, cond))
        control = part.expr([list(row["cell_genes"])])[0]
        n = int(row["n_genes"])
        if signature is None:
            genes = list(row["cell_genes"])[:n]
            return completion(
                f"I have no signature for {row['condition_text']}; the control cell stays as it is.",
                " ".join(genes),
            )
        predicted = np.clip(control + signature, 0, None)
        genes = [part.genes[j] for j in np.argsort(-predicted, kind="stable")[:n] if predicted[j] > 0]
        up = [part.genes[j] for j in np.argsort(-signature)[:3]]
        down = [part.genes[j] for j in np.argsort(signature)[:3]]
        if self.concise:
            return completion(f"up: {' '.join(up)}; down: {' '.join(down)}", " ".join(genes))
        think = (
            f"In training cells, {row['condition_text']} raises {', '.join(up)} and lowers {', '.join(down)} "
            "relative to control cells of the same context. Applying that change to this control cell and "
            "re-ranking gives the perturbed cell."
        )
        return completion(think, " ".join(genes))

    def _name_perturbation(self, part: _Part, row: Mapping[str, Any], perturbed: list[str]) -> str:
        ctx = str(row["context"])
        control = part.expr([list(row["cell_genes"])])[0]
        delta = part.expr([perturbed])[0] - control
        best, best_score = None, 0.05  # below this agreement, the change looks like no perturbation
        for cand in row["candidates"]:
            sig = part.signatures.get((ctx, str(cand)))
            if sig is None or not np.any(sig):
                continue
            score = float(np.dot(sig, delta) / ((np.linalg.norm(sig) * np.linalg.norm(delta)) or 1.0))
            if score > best_score:
                best, best_score = str(cand), score
        controls = [c for c in row["candidates"] if c not in {k[1] for k in part.signatures}]
        if best is None:
            label = controls[0] if controls else str(row["candidates"][0])
            return completion(
                "The change from the control cell matches no known perturbation signature.", label
            )
        if self.concise:
            return completion(perturbation_rationale(list(row["cell_genes"]), perturbed, best), best)
        think = (
            f"The perturbed cell differs from the control cell in a way that agrees best with the signature "
            f"of {best} (cosine {best_score:.2f}) among the candidates."
        )
        return completion(think, best)
