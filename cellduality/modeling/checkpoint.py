"""Check a model folder before loading it, so a missing, mistyped or damaged checkpoint gets a message
that names the folder and the missing or broken file, not a hub "Repo id" error, a missing
``sentencepiece`` or a raw safetensors exception.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

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
