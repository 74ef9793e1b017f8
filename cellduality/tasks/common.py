"""Pieces shared by the task builders: the record layout, seeded choices, gene hiding."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress
from operator import itemgetter
from typing import Any

import numpy as np

from cellduality.tasks.templates import SYSTEM_PROMPT

RECORD_COLUMNS: tuple[str, ...] = (
    "id",
    "task",
    "prompt",
    "answer",
    "candidates",
    "condition",
    "condition_text",
    "cell_genes",
    "visible_genes",
    "hidden_genes",
    "n_genes",
    "context",
    "cell_id",
    "dataset",
    "neighbours",
)


@dataclass(frozen=True)
class TaskConfig:
    """Knobs of example building.

    ``top_k``: genes per input cell sentence. ``n_genes``: genes a generation answer lists (defaults to
    ``top_k``). ``hidden_fraction``: share of an input sentence hidden for the in-painting dual.
    ``max_candidates``: cap on the perturbation dual's candidate list (the true one always included).
    ``max_examples``: cap per task and split (seeded sample), ``None`` for all cells.
    ``hidden_rule``: ``informative`` hides a sentence's genes that vary most across cells
    (:func:`presence_scores`), ``random`` a random subset.
    Neighbourhood editing (``cellduality.tasks.neighbourhood``): ``graph`` is a gene-gene edge list
    (``None``: GO BP from the embedded knowledge tables) and ``graph_min_weight`` drops lighter edges;
    ``max_neighbours`` caps the neighbourhood shown (by edge weight, seeded without weights);
    ``max_additions`` caps the training perturbations offered for addition (0: all of them).

    The paper's data design (``sft_examples``): the training split of each task is divided, seeded and
    without reading a label, into a labelled *SFT set* of ``sft_examples`` cells (the ``train`` split:
    everything fitted on labels reads it only) and a disjoint *RL pool* (the ``rl`` split: GRPO's
    prompts). ``rl_examples`` caps the RL pool's rows per task. ``None``: no RL pool, as before.
    """

    top_k: int = 100
    n_genes: int | None = None
    hidden_fraction: float = 0.25
    hidden_rule: str = "informative"
    max_candidates: int = 4
    max_examples: int | None = None
    seed: int = 0
    graph: str | None = None
    graph_min_weight: float | None = None
    max_neighbours: int = 20
    max_additions: int = 50
    sft_examples: int | None = None
    rl_examples: int | None = None

    def __post_init__(self) -> None:
        from cellduality.data.schema import DataError

        def positive(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        if not positive(self.top_k):
            raise DataError(
                f"genes per input sentence (--top-k; sentence_genes in a recipe) must be a positive integer, got {self.top_k}"
            )
        if self.n_genes is not None and not positive(self.n_genes):
            raise DataError(
                f"genes per generated cell (--n-genes; n_genes in a recipe) must be a positive integer, got {self.n_genes} "
                "(leave it out to use --top-k)"
            )
        if not 0.0 < float(self.hidden_fraction) < 1.0:
            raise DataError(
                f"--hidden-fraction is the share of a sentence hidden for in-painting and must be in (0, 1), "
                f"got {self.hidden_fraction}"
            )
        if self.max_examples is not None and not positive(self.max_examples):
            raise DataError(
                f"--max-examples must be a positive integer, got {self.max_examples} (leave it out for all)"
            )
        for flag, value in (("--sft-examples", self.sft_examples), ("--rl-examples", self.rl_examples)):
            if value is not None and not positive(value):
                raise DataError(f"{flag} must be a positive integer, got {value} (leave it out for none)")
        if self.rl_examples is not None and self.sft_examples is None:
            raise DataError(
                "--rl-examples caps the RL pool, which only --sft-examples creates: add --sft-examples"
            )
        if not positive(self.max_candidates) or self.max_candidates < 2:
            raise DataError(f"max_candidates must be at least 2, got {self.max_candidates}")
        if not isinstance(self.max_neighbours, int) or self.max_neighbours < 0:
            raise DataError(f"--max-neighbours must be 0 or more, got {self.max_neighbours}")
        if not isinstance(self.max_additions, int) or self.max_additions < 0:
            raise DataError(f"--max-additions must be 0 (all) or more, got {self.max_additions}")

    @property
    def answer_genes(self) -> int:
        return self.n_genes if self.n_genes is not None else self.top_k

    def sentence_settings(self) -> dict[str, int]:
        """What a model trained on these examples has learnt to read and write (see run metadata)."""
        return {"top_k": self.top_k, "n_genes": self.answer_genes}


def example_rng(seed: int, key: str) -> np.random.Generator:
    """A generator seeded by the run seed and a stable hash of the example id."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def opaque_id(seed: int, dataset: str, task: str, split: str, cell_id: str) -> str:
    """The stored id of an example: ``dataset/task/split/<digest>``.

    The digest hides the original cell id, which can encode a label (SCAD's ids contain ``br`` /
    ``par``, naming resistant / sensitive cells), and every id reaches the reward functions as a column.
    It is a stable hash of the seed and the cell (6-byte blake2b of ``seed/dataset/task/split/cell_id``),
    so the same preparation gives the same ids.
    """
    return opaque_ids(seed, dataset, task, split, [cell_id])[0]


def opaque_ids(seed: int, dataset: str, task: str, split: str, cell_ids: Sequence[str]) -> list[str]:
    """:func:`opaque_id` of each of ``cell_ids``, the one place the id is made: the hash of the shared
    prefix is computed once and continued per cell (``blake2b`` hashes a stream: ``copy`` then ``update``
    gives the digest of the whole string), half the time of a new hash per example."""
    head = f"{dataset}/{task}/{split}/"
    base = hashlib.blake2b(f"{seed}/{head}".encode(), digest_size=6)
    out = []
    for cell_id in cell_ids:
        digest = base.copy()
        digest.update(cell_id.encode())
        out.append(head + digest.hexdigest())
    return out


def presence_scores(sentences: Sequence[Sequence[str]]) -> dict[str, float]:
    """How much a gene's presence in a cell sentence varies across cells: ``p * (1 - p)``.

    ``p`` is the share of sentences that hold the gene. A gene in (nearly) every sentence, a
    housekeeping gene, scores ~0: it is predictable without knowing anything about the cell. A gene in
    about half of them scores highest: it is what tells cells apart. Label-free (only sentences are
    read) and the same for any value type (counts, log-normalised, z-scored).
    """
    counts: dict[str, int] = {}
    for sentence in sentences:
        for gene in dict.fromkeys(sentence):
            counts[gene] = counts.get(gene, 0) + 1
    n = max(1, len(sentences))
    return {g: (c / n) * (1 - c / n) for g, c in counts.items()}


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def shuffled(rng: np.random.Generator, items: Sequence[str]) -> list[str]:
    return [items[i] for i in rng.permutation(len(items))]


def join_genes(genes: Sequence[str]) -> str:
    return " ".join(genes)


def join_candidates(candidates: Sequence[str]) -> str:
    return ", ".join(candidates)


def messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def hide_genes(
    rng: np.random.Generator,
    sentence: Sequence[str],
    fraction: float,
    scores: Mapping[str, float] | None = None,
) -> tuple[list[str], list[str]]:
    """Split a sentence into visible genes (order kept) and hidden genes (rank order).

    With ``scores`` (:func:`presence_scores`), the hidden genes are the sentence's most informative
    ones (ties broken by ``rng``): genes that differ between cells, which a label can predict and the
    housekeeping genes left visible cannot. Without, a random subset (the original design, kept for
    comparison: its in-painting dual barely depends on the label, see docs/contracts.md).
    At least one gene is hidden and one stays visible whenever the sentence has two genes.
    """
    n = len(sentence)
    if n < 2:
        return list(sentence), []
    n_hidden = min(n - 1, max(1, round(n * fraction)))
    is_hidden = np.zeros(n, dtype=bool)
    if scores is None:
        is_hidden[rng.choice(n, size=n_hidden, replace=False)] = True
    else:
        jitter = rng.random(n)
        try:  # one C-level lookup of every gene (the usual case: the scores cover the sentences)
            values = itemgetter(*sentence)(scores)
        except KeyError:
            values = [scores.get(g, 0.0) for g in sentence]
        neg_scores = -np.asarray(values, dtype=np.float64)
        # by score (highest first), ties by the seeded jitter; lexsort is stable, like sorted()
        is_hidden[np.lexsort((jitter, neg_scores))[:n_hidden]] = True
    visible = list(compress(sentence, (~is_hidden).tolist()))
    hidden = list(compress(sentence, is_hidden.tolist()))
    return visible, hidden


def record(**fields: Any) -> dict[str, Any]:
    """A row with every record column, empty where the task does not use it."""
    row: dict[str, Any] = {
        "id": "",
        "task": "",
        "prompt": [],
        "answer": "",
        "candidates": [],
        "condition": "",
        "condition_text": "",
        "cell_genes": [],
        "visible_genes": [],
        "hidden_genes": [],
        "n_genes": 0,
        "context": "",
        "cell_id": "",
        "dataset": "",
        "neighbours": [],
    }
    unknown = fields.keys() - _RECORD_SET
    if unknown:
        raise KeyError(f"not record columns: {sorted(unknown)}")
    row.update(fields)
    return row


_RECORD_SET = frozenset(RECORD_COLUMNS)
