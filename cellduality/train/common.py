"""Steps the SFT and GRPO entry points share: model/tokenizer loading, the tiny model, run metadata."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cellduality.tasks.build import PreparedTasks
from cellduality.train.configs import CellDualityArguments

RUN_META = "cellduality_run.json"

logger = logging.getLogger(__name__)


def texts_of_tasks(prepared: PreparedTasks) -> list[str]:
    """Every prompt and answer text, to harvest the tiny tokenizer's vocabulary from."""
    texts: list[str] = []
    for split in prepared.datasets.values():
        for prompt in split["prompt"]:
            texts.extend(m["content"] for m in prompt)
        texts.extend(split["answer"])
    from cellduality.tasks import templates
    from cellduality.teacher.offline import RATIONALE_WORDS

    for name in ("INPAINT", "RECONSTRUCT_TYPE", "RECONSTRUCT_PERTURBATION"):
        texts.extend(getattr(templates, name))
    texts.append(RATIONALE_WORDS)
    return texts


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
        seen = {w.strip(",.;:").casefold() for text in texts for w in text.split()}
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


def write_run_meta(output_dir: str, prepared: PreparedTasks, extra: dict[str, Any]) -> None:
    """Keep the dataset meta (genes, fit, split) next to the checkpoint, for eval and for the next stage."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_META).write_text(json.dumps({"prepared": prepared.meta, **extra}, indent=1, default=str))


def last_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder of an interrupted run, to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    return get_last_checkpoint(str(out)) if out.is_dir() else None
