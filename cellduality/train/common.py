"""Steps the SFT and GRPO entry points share: model/tokenizer loading, the tiny model, run metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cellduality.tasks.build import PreparedTasks
from cellduality.tasks.dual import CLASSIFICATION_TASKS, label_words
from cellduality.train.configs import CellDualityArguments

RUN_META = "cellduality_run.json"

logger = logging.getLogger(__name__)


def texts_of_tasks(prepared: PreparedTasks, splits: tuple[str, ...] = ("train",)) -> list[str]:
    """Every text of the training rows, to harvest the tiny tokenizer's vocabulary from.

    Prompts, answers, candidate lists, conditions and contexts of the rows of ``splits`` (the training
    split: a held-out perturbation's name never enters the vocabulary through a test row), and every
    dual template. Gene symbols come from the dataset's gene list (``prepared.genes``), and ``+`` is a
    piece of its own, so test prompts (held-out combinations included) tokenize without ``<unk>``.
    """
    texts: list[str] = []
    # every count a prompt can state ("name the 4 hidden genes"): sentence lengths, not labels
    longest = max(
        (
            max([int(n) for n in ds["n_genes"]] + [len(g) for g in ds["cell_genes"]], default=0)
            for ds in prepared.datasets.values()
        ),
        default=0,
    )
    texts.append(" ".join(str(i) for i in range(longest + 1)))
    for name in splits:
        if name not in prepared.datasets:
            continue
        split = prepared.datasets[name]
        for prompt in split["prompt"]:
            texts.extend(m["content"] for m in prompt)
        texts.extend(split["answer"])
        for candidates in split["candidates"]:
            texts.append(", ".join(candidates))
        texts.extend(split["condition"])
        texts.extend(split["condition_text"])
        texts.extend(split["context"])
        for row in split.select_columns(["task", "candidates", "condition", "condition_text"]):
            if row["task"] in CLASSIFICATION_TASKS:  # the label words of in-painting prompts
                texts.extend(label_words(row, c) for c in row["candidates"])
    from cellduality.tasks import templates
    from cellduality.teacher.offline import RATIONALE_WORDS

    for name in ("INPAINT", "RECONSTRUCT_TYPE", "RECONSTRUCT_PERTURBATION"):
        texts.extend(getattr(templates, name))
    texts.append(RATIONALE_WORDS)
    return texts


def input_genes(prepared: PreparedTasks) -> set[str]:
    """Case-folded gene symbols that occur in any split's input cell sentences (never in answers).

    What ``tiny_seen_genes_only`` keeps: a test cell's input genes must be tokens, but the test answers
    (the reference cells) are not read.
    """
    seen: set[str] = set()
    for split in prepared.datasets.values():
        for genes in split["cell_genes"]:
            seen.update(g.casefold() for g in genes)
        for prompt in split["prompt"]:
            for m in prompt:
                seen.update(w.strip(",.;:").casefold() for w in m["content"].split())
    return seen


def ensure_model(
    cd_args: CellDualityArguments, model_path: str, prepared: PreparedTasks, training_args: Any
) -> None:
    """Build the tiny offline model at ``model_path`` when the recipe asks for it and it is missing.

    A folder that already holds a model (the SFT checkpoint the README's GRPO step starts from, with the
    recipe's ``build_tiny_model: true`` still in force) is used as it is: nothing is built and nothing is
    deleted. A folder with other files is refused by ``ensure_tiny_model``, untouched.
    """
    if not cd_args.build_tiny_model:
        return
    from cellduality.modeling import ensure_tiny_model, is_tiny_model_dir

    folder = Path(model_path)
    if (folder / "config.json").is_file() and not is_tiny_model_dir(folder):
        if training_args.process_index == 0:
            logger.info(
                "build_tiny_model: %s already holds a model; training starts from it (nothing is built "
                "or deleted)",
                folder,
            )
        return

    texts = texts_of_tasks(prepared)
    genes = prepared.genes
    if cd_args.tiny_seen_genes_only:
        seen = {w.strip(",.;:").casefold() for text in texts for w in text.split()} | input_genes(prepared)
        genes = [g for g in genes if g.casefold() in seen]
    with training_args.main_process_first(desc="building the tiny model"):
        ensure_tiny_model(
            model_path,
            genes,
            texts,
            hidden_size=cd_args.tiny_hidden_size,
            num_layers=cd_args.tiny_num_layers,
            seed=training_args.seed,
        )


def apply_auto_vllm(cd_args: CellDualityArguments, training_args: Any) -> None:
    """``auto_vllm``: use vLLM generation exactly when it is installed and a CUDA GPU is present."""
    if not cd_args.auto_vllm:
        return
    import torch
    from trl.import_utils import is_vllm_available

    training_args.use_vllm = bool(is_vllm_available() and torch.cuda.is_available())


def load_model_and_tokenizer(model_args: Any, training_args: Any):
    """A causal LM and its tokenizer from ``model_name_or_path`` (any Hugging Face causal LM folder)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_args.model_name_or_path
    if path is None:
        raise ValueError("model_name_or_path is required")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = model_args.dtype
    if dtype not in (None, "auto"):
        dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        revision=model_args.model_revision,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )
    return model, tokenizer


def write_run_meta(output_dir: str, prepared: PreparedTasks | dict[str, Any], extra: dict[str, Any]) -> None:
    """Keep the dataset meta (genes, fit, split) next to the checkpoint, for eval and for the next stage.

    ``prepared`` is the prepared tasks or just their ``meta`` (what the GRPO trainer keeps).
    """
    meta = prepared.meta if isinstance(prepared, PreparedTasks) else prepared
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_META).write_text(json.dumps({"prepared": meta, **extra}, indent=1, default=str))


def last_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of an interrupted run, to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    return get_last_checkpoint(str(out)) if out.is_dir() else None
