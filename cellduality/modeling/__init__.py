"""Tiny offline model and gene-symbol tokenizer, for the demo, the tiny-cpu recipes and the tests.

Importing this package is light: torch, tokenizers and transformers load only when a builder is called,
so ``cellduality`` commands that never build a model do not pay their import time.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "TinyModelRefused",
    "build_tiny_model",
    "build_tokenizer",
    "ensure_tiny_model",
    "is_tiny_model_dir",
    "split_pieces",
    "tiny_config",
    "vocabulary_from",
    "words_from",
]

_TOKENIZER = {"CHAT_TEMPLATE", "build_tokenizer", "split_pieces", "vocabulary_from", "words_from"}
_TINY = {"TinyModelRefused", "build_tiny_model", "ensure_tiny_model", "is_tiny_model_dir", "tiny_config"}


def __getattr__(name: str) -> Any:
    """Load the public names on first use (PEP 562)."""
    if name in _TOKENIZER:
        from cellduality.modeling import tokenizer

        return getattr(tokenizer, name)
    if name in _TINY:
        from cellduality.modeling import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
