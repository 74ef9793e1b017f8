"""On the CPU, TRL's fused LM head projects only the positions that have a label.

Why: TRL 1.16 computes the training loss of SFT and GRPO with a fused LM head
(``trl.trainer.utils.add_fused_lm_head``) that never materialises the ``(batch, length, vocab)``
logits. On CUDA it projects only the positions whose label is not ``-100`` (``compact``); on every
other device it projects *every* position and zeroes the unlabelled ones afterwards, because on
compiled back ends (Neuron, XLA) a changing number of positions would recompile the tiles each batch.
Nothing compiles on our CPU runs, and most positions carry no label: the demo's SFT trains on the
completion only (about 21 of 150 tokens per example) and GRPO on the completion only, so on the tiny
Llama (a 4,183-word vocabulary, 128 wide) the head's forward and backward were more than half of an
SFT step. Projecting the labelled positions only gives the same per-token log-probabilities, the
same loss and the same gradients (the unlabelled positions' gradients were zeroed anyway); only the
order of floating-point sums inside the head's matrix products may differ.
``benchmarks/train_speed.py`` measures the effect and checks the losses.

TRL decides with ``trl.trainer.utils._use_triton(device)`` (a private name). :func:`compact_lm_head`
wraps it so that it also says yes for ``cpu`` devices there; the kernel choice (Triton vs torch
tiles) is made in ``trl.kernels.chunked_logprob`` with its own binding and is not affected, so the
CPU keeps TRL's torch tiles. When TRL no longer has that name this is a no-op that returns False.
``CELLDUALITY_COMPACT_LM_HEAD=0`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any


def _compact_on_cpu(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    def use_compact(device: Any) -> bool:
        return getattr(device, "type", None) == "cpu" or original(device)

    use_compact.cellduality_original = original  # type: ignore[attr-defined]
    return use_compact


def compact_lm_head(enabled: bool | None = None) -> bool:
    """Make TRL's fused LM head score labelled positions only on the CPU (``enabled=False`` undoes it).

    ``enabled=None`` reads ``CELLDUALITY_COMPACT_LM_HEAD`` (on unless ``0``). Returns whether the compact
    head is in force on the CPU afterwards. Idempotent; process-wide (TRL's module is shared).
    """
    if enabled is None:
        enabled = os.environ.get("CELLDUALITY_COMPACT_LM_HEAD", "1") != "0"
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        return False
    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        return False
    installed = hasattr(current, "cellduality_original")
    if enabled and not installed:
        trl_utils._use_triton = _compact_on_cpu(current)
    elif not enabled and installed:
        trl_utils._use_triton = current.cellduality_original
    return enabled


__all__ = ["compact_lm_head"]
