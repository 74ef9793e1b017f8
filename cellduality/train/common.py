"""Steps the SFT and GRPO entry points share: model/tokenizer loading, the tiny model, resuming.

The run metadata they write beside the checkpoint is :mod:`cellduality.modeling.checkpoint`'s.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cellduality.modeling.checkpoint import sentence_mismatch
from cellduality.tasks.build import PreparedTasks
from cellduality.tasks.dual import CLASSIFICATION_TASKS, label_words
from cellduality.train.configs import CellDualityArguments

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
    with training_args.main_process_first(local=False, desc="building the tiny model"):
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


def warn_sentence_mismatch(model_path: str, data_meta: dict[str, Any], what: str, training_args: Any) -> None:
    """Print :func:`sentence_mismatch`'s warning once (main process)."""
    message = sentence_mismatch(model_path, data_meta, what)
    if message and getattr(training_args, "process_index", 0) == 0:
        import sys

        print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_complete(folder: Path) -> bool:
    """A ``checkpoint-N`` whose save finished: the Trainer writes ``trainer_state.json`` last."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        return False
    try:
        json.loads(state.read_text())
    except ValueError:
        return False
    return True


def last_checkpoint(output_dir: str, main_process: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` of an interrupted run, to resume from.

    A checkpoint whose save was interrupted (killed mid-save: no ``trainer_state.json``) cannot be resumed
    from; it is skipped with a note and renamed ``incomplete-checkpoint-N`` by the main process (kept, not
    deleted, and out of the way of the Trainer's checkpoint rotation), and the next newest is used.
    """
    import re
    import sys

    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for path in out.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    skipped: list[Path] = []
    chosen: Path | None = None
    for _, path in sorted(found, reverse=True):
        if checkpoint_complete(path):
            chosen = path
            break
        skipped.append(path)
    for path in skipped:
        # a name the Trainer's checkpoint rotation (glob "checkpoint-*") never sees, so never deletes
        target = path.with_name(f"incomplete-{path.name}")
        n = 2
        while target.exists():
            target = path.with_name(f"incomplete-{path.name}-{n}")
            n += 1
        if main_process:
            path.rename(target)
            then = (
                f"resuming from {chosen.name}" if chosen else "no complete checkpoint: training starts afresh"
            )
            print(
                f"note: {path} is incomplete (no trainer_state.json: its save was interrupted); moved it to "
                f"{target.name} and {then}",
                file=sys.stderr,
                flush=True,
            )
    return str(chosen) if chosen else None


def check_resume(path: str | None) -> None:
    """Refuse an explicit ``resume_from_checkpoint`` that cannot be resumed from (one line, not a traceback)."""
    if not path or not isinstance(path, str) or path.lower() in ("true", "false"):
        return
    from cellduality.data.schema import DataError

    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"resume_from_checkpoint {folder} is not a folder")
    if not checkpoint_complete(folder):
        raise DataError(
            f"resume_from_checkpoint {folder} is incomplete (no readable trainer_state.json: its save was "
            "interrupted); name an earlier checkpoint-N, or leave resume_from_checkpoint out to use the "
            "newest complete one"
        )


#: per-rank records of a run on several processes: ``<output_dir>/ranks/rank<N>.json``
RANKS_DIR = "ranks"


def write_rank_state(trainer: Any, output_dir: str, extra: dict[str, Any] | None = None) -> Path | None:
    """What this rank ended with, when the run has several ranks: its machine, step and a digest of its
    full parameters, so that a multi-machine run can be checked for ranks that drifted apart (DDP keeps
    every rank's weights identical; a digest that differs means they were not in sync).

    Under ZeRO-3 a rank holds only a shard of each parameter, so no digest is taken (``None``).
    Nothing is written for a single-process run.
    """
    import hashlib
    import socket

    accelerator = trainer.accelerator
    if accelerator.num_processes <= 1:
        return None
    model = accelerator.unwrap_model(trainer.model)
    params = sorted(model.named_parameters(), key=lambda item: item[0])
    sharded = any(hasattr(p, "ds_id") for _, p in params)
    digest = None
    if not sharded:
        h = hashlib.sha256()
        for name, p in params:
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        digest = h.hexdigest()
    state = {
        "rank": accelerator.process_index,
        "local_rank": accelerator.local_process_index,
        "world_size": accelerator.num_processes,
        "machine": socket.gethostname(),
        "machine_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)) or 0),
        "global_step": int(trainer.state.global_step),
        "params_sha256": digest,
        **(extra or {}),
    }
    folder = Path(output_dir) / RANKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank{accelerator.process_index}.json"
    path.write_text(json.dumps(state, indent=1))
    return path
