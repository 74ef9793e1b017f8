"""TRL's fused LM head on the CPU: the same tile arithmetic in fewer passes over memory.

Why: TRL's fused LM head (``trl.kernels.chunked_logprob.ChunkedLogProbFunction``) projects the labelled
positions onto the vocabulary tile by tile and folds each ``[tokens, vocab]`` tile into the per-token
log-probability, entropy and top-1 flag. On devices without Triton it folds a tile with torch
operations (``_forward_tile``, ``_backward_tile``) written to mirror the Triton kernel for any model:
a logit scale, a soft cap and a temperature applied by copies even when they are 1, a boolean mask
and a masked copy of the tile to find the largest logit before the target, and a backward that builds
the gradient from a zero tensor in eight more passes. On the demo's SFT (4,029 words, about 670
labelled positions a batch) that was about 15% of a step, almost all of it passes over tiles of ~10
MB, not the projection.

Here, in the common case (float32 tiles, logit scale 1, no soft cap, no entropy gradient) each tile is
folded with the same IEEE operations on the same values, in place where TRL allocated, so every
output is the same to the bit:

- ``x * 1.0`` is ``x`` exactly, so a scale of 1 is skipped; a temperature other than 1 is applied;
- the largest logit before the target only decides ``is_top1`` (the target is the *first* argmax):
  ``torch.max`` gives the tile's maximum and its first index in one pass, and a tile then contributes
  its maximum where that index lies before the target, and nothing where it does not (then the target
  is that maximum, or below it and so not top-1 anyway): the flag is TRL's in every case;
- the backward's ``0 + g * (1[j = target] - p)`` is ``p * -g`` with the target's entry written
  separately, then ``+ 0.0``, which gives a zero the sign TRL's sum gives it.

Anything else (bf16 tiles, a scale, a soft cap, an entropy bonus) goes to TRL's own functions.
``tests/test_head_tiles.py`` compares every output and gradient bit for bit with TRL's, across tiles,
temperatures and ties; ``benchmarks/train_speed.py`` measures the effect.
``CELLDUALITY_LEAN_HEAD_TILES=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def _simple(tile: torch.Tensor, logit_scale: float, HAS_SOFTCAP: bool) -> bool:
    return tile.dtype == torch.float32 and logit_scale == 1.0 and not HAS_SOFTCAP


def _forward_tile(
    tile: torch.Tensor,
    tile_stride: int,
    targets: torch.Tensor,
    running_max: torch.Tensor,
    sum_exp: torch.Tensor,
    x_sum_exp: torch.Tensor,
    sq_sum_exp: torch.Tensor,
    z_sum: torch.Tensor,
    max_before_target: torch.Tensor,
    target_logit: torch.Tensor,
    vocab_start: int,
    n_cols: int,
    logit_scale: float,
    softcap: float,
    inv_t: float,
    HAS_SOFTCAP: bool,
    HAS_ENTROPY: bool,
    HAS_LOG_SUM_SQ_PROBS: bool,
    HAS_MEAN_LOGITS: bool,
    HAS_IS_TOP1: bool,
    BLOCK_SIZE: int,
) -> None:
    """TRL's ``_forward_tile`` (same arguments, same results), in fewer passes; the tile is scratch."""
    if not _simple(tile, logit_scale, HAS_SOFTCAP):
        return _original["_forward_tile"](
            tile, tile_stride, targets, running_max, sum_exp, x_sum_exp, sq_sum_exp, z_sum,
            max_before_target, target_logit, vocab_start, n_cols, logit_scale=logit_scale, softcap=softcap,
            inv_t=inv_t, HAS_SOFTCAP=HAS_SOFTCAP, HAS_ENTROPY=HAS_ENTROPY, HAS_LOG_SUM_SQ_PROBS=HAS_LOG_SUM_SQ_PROBS,
            HAS_MEAN_LOGITS=HAS_MEAN_LOGITS, HAS_IS_TOP1=HAS_IS_TOP1, BLOCK_SIZE=BLOCK_SIZE,
        )  # fmt: skip
    z = tile if inv_t == 1.0 else tile.mul_(inv_t)  # TRL: z = tile * logit_scale * inv_t
    local = targets - vocab_start
    in_tile = (local >= 0) & (local < n_cols)
    if HAS_MEAN_LOGITS:
        z_sum += z.sum(-1)
    tile_max, first = z.max(-1)  # the maximum (TRL's amax) and its first index, in one pass
    if HAS_IS_TOP1:
        # TRL: the maximum over the positions before the target. Target beyond this tile: the whole tile
        # (TRL's value). Target in it: the tile's maximum where its first index lies before the target;
        # otherwise the target is that first maximum (every earlier logit is smaller) or below it (then not
        # top-1 whatever this holds), so it contributes nothing. Target before the tile: nothing (TRL's too).
        contribution = torch.where((local >= n_cols) | (in_tile & (first < local)), tile_max, -torch.inf)
        max_before_target.copy_(torch.maximum(max_before_target, contribution))
    new_m = torch.maximum(running_max, tile_max)
    rescale = torch.exp(running_max - new_m)
    e = z - new_m.unsqueeze(-1)
    e.exp_()
    sum_exp.mul_(rescale).add_(e.sum(-1))
    if HAS_LOG_SUM_SQ_PROBS:
        sq_sum_exp.mul_(rescale * rescale).add_((e * e).sum(-1))
    if HAS_ENTROPY:
        x_sum_exp.mul_(rescale).add_(e.mul_(z).sum(-1))
    running_max.copy_(new_m)
    target_z = z.gather(-1, local.clamp(0, n_cols - 1).unsqueeze(-1)).squeeze(-1)
    target_logit.copy_(torch.where(in_tile, target_z, target_logit))
    return None


def _backward_tile(
    tile: torch.Tensor,
    tile_stride: int,
    targets: torch.Tensor,
    log_z: torch.Tensor,
    entropy: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor,
    vocab_start: int,
    n_cols: int,
    logit_scale: float,
    softcap: float,
    inv_t: float,
    HAS_SOFTCAP: bool,
    HAS_LOGPROB_GRAD: bool,
    HAS_ENTROPY_GRAD: bool,
    BLOCK_SIZE: int,
) -> None:
    """TRL's ``_backward_tile`` (same arguments, the same gradient in ``tile``), in fewer passes."""
    if HAS_ENTROPY_GRAD or not HAS_LOGPROB_GRAD or not _simple(tile, logit_scale, HAS_SOFTCAP):
        return _original["_backward_tile"](
            tile, tile_stride, targets, log_z, entropy, grad_logprobs, grad_entropy, vocab_start, n_cols,
            logit_scale=logit_scale, softcap=softcap, inv_t=inv_t, HAS_SOFTCAP=HAS_SOFTCAP,
            HAS_LOGPROB_GRAD=HAS_LOGPROB_GRAD, HAS_ENTROPY_GRAD=HAS_ENTROPY_GRAD, BLOCK_SIZE=BLOCK_SIZE,
        )  # fmt: skip
    if inv_t != 1.0:
        tile.mul_(inv_t)  # z
    p = tile.sub_(log_z.unsqueeze(-1)).exp_()  # TRL: log_p = z - log_z; p = exp(log_p)
    local = targets - vocab_start
    rows = torch.nonzero((local >= 0) & (local < n_cols)).squeeze(-1)
    cols = local[rows]
    g = grad_logprobs.unsqueeze(-1)
    # the target's entry: (1 - p) * g, as TRL computes it
    target_grad = (1.0 - p[rows, cols]) * grad_logprobs[rows]
    # every other entry: TRL's g * (0 - p), which is p * -g up to the sign of a zero, fixed by the + 0.0
    p.mul_(g.neg())
    p[rows, cols] = target_grad
    p.add_(0.0)  # TRL: 0 + g * (...); -0.0 + 0.0 is +0.0
    if inv_t != 1.0:
        p.mul_(inv_t)
    return None


_original: dict[str, Any] = {}


def lean_head_tiles(enabled: bool | None = None) -> bool:
    """Fold TRL's fused LM-head tiles on the CPU with the functions above (``enabled=False`` undoes it).

    ``enabled=None`` reads ``CELLDUALITY_LEAN_HEAD_TILES`` (on unless ``0``). Returns whether they are in
    force afterwards. Idempotent; process-wide (TRL's module is shared). A TRL without these names
    (``_forward_tile``, ``_backward_tile``) is left alone and this returns False.
    """
    if enabled is None:
        enabled = os.environ.get("CELLDUALITY_LEAN_HEAD_TILES", "1") != "0"
    try:
        from trl.kernels import chunked_logprob as kernels
    except ImportError:  # pragma: no cover - TRL is a dependency
        return False
    if not all(callable(getattr(kernels, name, None)) for name in ("_forward_tile", "_backward_tile")):
        return False
    installed = kernels._forward_tile is _forward_tile
    if enabled and not installed:
        _original.update(_forward_tile=kernels._forward_tile, _backward_tile=kernels._backward_tile)
        kernels._forward_tile, kernels._backward_tile = _forward_tile, _backward_tile
    elif not enabled and installed:
        kernels._forward_tile, kernels._backward_tile = (
            _original["_forward_tile"],
            _original["_backward_tile"],
        )
    return enabled


__all__ = ["lean_head_tiles"]
