"""The checkpoint contract: what a model folder must hold, and the run metadata written beside it.

Run metadata (:data:`RUN_META`, ``cellduality_run.json``) is written by the training stages
(:func:`write_run_meta`: the prepared meta of every dataset trained on, the sentence settings, the
stage's own facts) and found one way (:func:`run_meta_path`: in the model folder, or for a
``checkpoint-N`` or ``merged`` folder in the run's folder above it) by training, eval
(:func:`sentence_mismatch`) and prediction (:mod:`cellduality.predict.checkpoint`).

:func:`check_model_folder` checks a model folder before loading it, so a missing, mistyped or damaged
checkpoint gets a message that names the folder and the missing or broken file, not a hub "Repo id"
error, a missing ``sentencepiece`` or a raw safetensors exception.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cellduality.data.schema import DataError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelFolderError(DataError):
    """A model folder that cannot be loaded; the message names the folder, the file and the fix."""


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local folder rather than a hub id (``org/name`` or ``name``)."""
    if os.path.isabs(path) or path.startswith((".", "~")) or "\\" in path:
        return True
    parts = [p for p in path.split("/") if p]
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def _check_safetensors(file: Path) -> None:
    """Header and size of a ``.safetensors`` file: a truncated or damaged one is named."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(handle.read(n))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(
            f"{file} is damaged ({exc}): the save was interrupted or the copy is incomplete; save or copy "
            "the checkpoint again"
        ) from exc
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFolderError(
            f"{file} is truncated ({size:,} bytes, its header describes {8 + n + end:,}): the save was "
            "interrupted or the copy is incomplete; save or copy the checkpoint again"
        )


def check_model_folder(path: str | Path, adapter: str | Path | None = None, flag: str = "--model") -> None:
    """Raise :class:`ModelFolderError` when ``path`` (a local model folder) cannot be loaded.

    A hub id (``org/name``) that is not a local folder is left to the hub, except with
    ``HF_HUB_OFFLINE=1`` where it must be in the local cache.
    """
    text = str(path)
    folder = Path(text).expanduser()
    if not folder.exists():
        if looks_local(text):
            parent = folder.parent
            near = ""
            if parent.is_dir():
                names = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8]
                near = f"; {parent} holds: {', '.join(names) or '(nothing)'}"
            raise ModelFolderError(f"{flag} {text}: no such model folder{near}")
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(text, "config.json"), str):
                raise ModelFolderError(
                    f"{flag} {text}: no such model folder here, and no hub model of that name in the "
                    "Hugging Face cache (HF_HUB_OFFLINE=1); give the path of a model folder, or download "
                    "the model first"
                )
        return
    if not folder.is_dir():
        raise ModelFolderError(f"{flag} {text} is a file; give the model's folder")
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            return  # a LoRA adapter: its base is checked when it is resolved
        raise ModelFolderError(
            f"{flag} {text} holds no config.json, so it is not a saved model (files: "
            f"{', '.join(sorted(p.name for p in folder.iterdir())[:10]) or 'none'}); point at the training "
            "run's output_dir or one of its checkpoint-N folders"
        )
    try:
        json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise ModelFolderError(
            f"{folder / 'config.json'} is not valid JSON ({exc}): the folder is damaged"
        ) from exc
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{flag} {text} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])} ...): save the "
            "tokenizer there too (tokenizer.save_pretrained), or copy its files from the base model"
        )
    weights = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not weights:
        raise ModelFolderError(
            f"{flag} {text} has no weights (none of {', '.join(WEIGHT_FILES)}): the save did not finish or "
            "the weights were not copied"
        )
    for file in weights:
        if file.name == "model.safetensors":
            _check_safetensors(file)
        elif file.name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as exc:
                raise ModelFolderError(f"{file} is damaged ({exc})") from exc
            for shard in shards:
                if not (folder / shard).is_file():
                    raise ModelFolderError(
                        f"{flag} {text}: weight shard {shard} (listed in {file.name}) is missing"
                    )
                if shard.endswith(".safetensors"):
                    _check_safetensors(folder / shard)
    if adapter is not None:
        adapter_dir = Path(adapter)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelFolderError(
                f"adapter {adapter}: no adapter_config.json there (not a LoRA adapter folder)"
            )
        for name in ("adapter_model.safetensors",):
            if (adapter_dir / name).is_file():
                _check_safetensors(adapter_dir / name)


# ----------------------------------------------------------------------------------------------------
# run metadata

RUN_META = "cellduality_run.json"


def run_meta_path(model: str | Path | None) -> Path | None:
    """Where the run metadata of ``model`` is, or ``None``: the one rule every reader uses.

    In the model folder itself, or, for a ``checkpoint-N`` folder or the ``merged`` folder of a LoRA run,
    in the run's folder above it (the run writes it once, next to the final model).
    """
    if not model:
        return None
    folder = Path(model)
    candidates = [folder / RUN_META]
    if folder.name.startswith("checkpoint-") or folder.name == "merged":
        candidates.append(folder.parent / RUN_META)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def read_run_meta(model_path: str | Path | None) -> dict[str, Any] | None:
    """The run metadata of a model folder (or of the run a ``checkpoint-N`` folder belongs to).

    ``None`` when there is none or it is not valid JSON (a reader that must refuse such a folder says so
    itself, as prediction does).
    """
    path = run_meta_path(model_path)
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def sentence_settings(meta: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    """Per dataset, the sentence settings (``top_k``, ``n_genes``) of a prepared meta (merged or not)."""
    if "parts" in meta:
        out: dict[str, dict[str, int]] = {}
        for part in meta["parts"].values():
            out.update(sentence_settings(part))
        return out
    found = meta.get("sentences")
    if not found:
        cfg = meta.get("config") or {}
        if "top_k" not in cfg:
            return {}
        found = {"top_k": cfg["top_k"], "n_genes": cfg.get("n_genes") or cfg["top_k"]}
    return {str(meta.get("dataset", "")): {"top_k": int(found["top_k"]), "n_genes": int(found["n_genes"])}}


def write_run_meta(output_dir: str | Path, prepared: Any, extra: Mapping[str, Any]) -> None:
    """Keep the dataset meta (genes, fit, split) next to the checkpoint, for eval and for the next stage.

    ``sentences`` records, per dataset, the sentence settings the model was trained with (genes per input
    sentence and per generated cell): a model trained on 16-gene sentences answers 100-gene ones poorly,
    so ``eval`` and ``grpo`` compare it with the data they are given. ``prepared`` is the prepared tasks
    (:class:`cellduality.tasks.PreparedTasks`) or just their ``meta`` (what the GRPO trainer keeps).
    """
    meta = prepared if isinstance(prepared, Mapping) else prepared.meta
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"prepared": meta, "sentences": sentence_settings(meta), **extra}
    (out / RUN_META).write_text(json.dumps(payload, indent=1, default=str))


def sentence_mismatch(model_path: str | Path | None, data_meta: dict[str, Any], what: str) -> str | None:
    """A warning when the model was trained on other sentence settings than ``data_meta`` has, else None."""
    run = read_run_meta(model_path)
    if not run:
        return None
    trained = run.get("sentences") or sentence_settings(run.get("prepared") or {})
    given = sentence_settings(data_meta)
    if not trained or not given:
        return None
    distinct = {json.dumps(v, sort_keys=True) for v in trained.values()}
    problems = []
    for dataset, settings in given.items():
        ref = trained.get(dataset)
        if ref is None and len(distinct) == 1:
            ref = next(iter(trained.values()))
        if ref is not None and ref != settings:
            problems.append(
                f"{dataset}: {settings['top_k']}-gene input sentences and {settings['n_genes']}-gene answers, "
                f"trained with {ref['top_k']} and {ref['n_genes']}"
            )
    if not problems:
        return None
    ref = next(iter(trained.values()))
    return (
        f"{model_path} was trained on other cell sentences than {what} ({'; '.join(problems)}): its answers "
        "will be poor. Prepare the data with the training settings (cellduality prepare --top-k "
        f"{ref['top_k']} --n-genes {ref['n_genes']}), or use the prepared folder the run saved "
        "(<output_dir>/prepared)"
    )
