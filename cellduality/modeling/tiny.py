"""A tiny Llama model built offline, so the demo, the tiny-cpu recipes and the tests need no model hub.

The model is a real ``LlamaForCausalLM`` (the architecture family of the paper's
Llama-3.2-3B-Instruct, tied embeddings and grouped-query attention included), only 64 wide and two
layers deep, so TRL's SFT and GRPO trainers, ``accelerate launch`` and DeepSpeed run through exactly the
code paths a real model takes, in seconds on a CPU. It is saved in the ``from_pretrained`` layout next to
its tokenizer (:mod:`cellduality.modeling.tokenizer`) and a generation config, so a recipe can name its
directory as ``model_name_or_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cellduality.modeling.tokenizer import build_tokenizer

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import LlamaConfig

#: Files that make a saved tiny model usable; :func:`ensure_tiny_model` rebuilds when one is missing.
REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
#: Written last: its presence means the directory was completely built by :func:`build_tiny_model`.
MARKER_FILE = "cellduality_tiny.json"


def tiny_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaConfig:
    """The ``LlamaConfig`` of a tiny model; fewer key/value heads than query heads, as in Llama 3.2."""
    from transformers import LlamaConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    genes: Iterable[str],
    texts: Iterable[Any] = (),
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    *,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
) -> Path:
    """Build, randomly initialise (seeded) and save a tiny Llama model plus tokenizer in ``out_dir``.

    ``genes`` and ``texts`` (prompts, answers, chat messages: anything
    :func:`cellduality.modeling.tokenizer.words_from` reads) make up the vocabulary; words the model
    never saw become ``<unk>``. The same inputs and seed give the same vocabulary and the same weights.
    The caller's global RNG state is left untouched. Returns ``out_dir`` as a ``Path``.
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    out = Path(out_dir)
    texts = list(texts) if not isinstance(texts, (str, bytes)) else [texts]
    tokenizer = build_tokenizer(genes, texts, model_max_length=max_position_embeddings)
    config = tiny_config(
        len(tokenizer),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out.mkdir(parents=True, exist_ok=True)
    _save_model(model, out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    marker = {
        "builder": "cellduality.modeling.tiny.build_tiny_model",
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "seed": seed,
        "parameters": n_params,
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    _make_readable(out)
    return out


def _make_readable(directory: Path) -> None:
    """Give the directory and its files the usual umask permissions.

    ``tempfile.mkdtemp`` creates 0700 directories and safetensors writes 0600 files; a model shared by
    several users (a lab's cache directory) must be readable like any other file.
    """
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for item in directory.iterdir():
        if item.is_file():
            item.chmod(0o666 & ~umask)


def _save_model(model: Any, out: Path) -> None:
    """Write config, generation config and safetensors weights on whichever rank calls this.

    ``PreTrainedModel.save_pretrained`` (transformers 5) silently writes no weights and no config on
    ranks other than 0 once ``torch.distributed`` is initialised, so ranks that build their own copy
    under ``accelerate launch`` would end up with an incomplete directory. The tied ``lm_head`` is left
    out of the file, as ``save_pretrained`` does; ``from_pretrained`` re-ties it.
    """
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def is_tiny_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a completely saved tiny model (all files plus the marker written last)."""
    p = Path(path)
    return all((p / name).is_file() for name in (*REQUIRED_FILES, MARKER_FILE))


class TinyModelRefused(ValueError):
    """``ensure_tiny_model`` was pointed at a folder that holds something other than a tiny model."""


def _holds_a_model(path: Path) -> bool:
    """Whether ``path`` looks like a saved Hugging Face model (a trained checkpoint, a download)."""
    return (path / "config.json").is_file()


def ensure_tiny_model(
    path: str | os.PathLike[str],
    genes: Iterable[str],
    texts: Iterable[Any] = (),
    **kwargs: Any,
) -> Path:
    """Build the tiny model at ``path`` unless a complete one is already there; return ``path``.

    This is what the tiny-cpu recipes rely on so they run right after installation. The model is built
    in a temporary sibling directory and renamed into place, so several processes (the ranks of one
    ``accelerate launch``) may call this at once: one rename wins, the others discard their copy, and
    nobody ever reads a half-written directory.

    Nothing that was there before is ever deleted: ``path`` must not exist, be an empty folder, or
    already hold a complete tiny model. Anything else (a trained checkpoint, a user's files, a folder
    left by some other program) raises :class:`TinyModelRefused` naming the folder, and the folder is
    left exactly as it was. Only the temporary directory this call created is removed.
    ``kwargs`` go to :func:`build_tiny_model`.
    """
    target = Path(path)
    if is_tiny_model_dir(target):
        return target
    refuse_unless_empty(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        build_tiny_model(tmp, genes, texts, **kwargs)
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # empty: nothing to lose (rmdir refuses a folder that filled meanwhile)
        try:
            tmp.rename(target)
        except OSError:
            if not is_tiny_model_dir(target):  # not a lost race: a real failure, or someone's files
                refuse_unless_empty(target)
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # our own temporary build, never the target
    return target


def refuse_unless_empty(target: Path) -> None:
    """Raise :class:`TinyModelRefused` unless ``target`` is missing or an empty folder."""
    if target.is_file():
        raise TinyModelRefused(
            f"cannot build the tiny model at {target}: it is a file; give build_tiny_model a folder path"
        )
    if target.is_dir() and any(target.iterdir()):
        what = "a model that is not the tiny offline model" if _holds_a_model(target) else "other files"
        raise TinyModelRefused(
            f"refusing to build the tiny model in {target}: the folder already holds {what}, and "
            "nothing there is deleted; point model_name_or_path at an empty or new folder, or turn "
            "build_tiny_model off to use the model that is there"
        )
