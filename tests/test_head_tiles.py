"""TRL's fused LM-head tiles folded in fewer passes on the CPU: every output and gradient the same bits."""

from __future__ import annotations

import pytest
import torch

from cellduality.train.head_tiles import lean_head_tiles

OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _bits(x: torch.Tensor | None) -> torch.Tensor | None:
    """The raw bits (so +0.0 and -0.0 differ, unlike ``torch.equal``)."""
    if x is None or x.dtype == torch.bool:
        return x
    return x.contiguous().view(torch.int32)


def _run(lean: bool, temperature: float, chunk: int, entropy_in_loss: bool, seed: int = 0) -> list:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    g = torch.Generator().manual_seed(seed)
    n, h, v = 57, 16, 301
    weight = torch.randn(v, h, generator=g)
    weight[200] = weight[3]  # tied logits: token 200 ties an earlier token, so it is never the first argmax
    weight[150] = weight[140]  # ... and a tie across tiles when a chunk is smaller than 10 words
    hidden = torch.randn(n, h, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:4] = torch.tensor([200, 3, 150, 140])
    hidden[:4] = hidden[4] * 0 + weight[3] * 3  # rows whose top token is 3 (and its twin 200)
    hidden[2:4] = weight[140] * 3
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    lean_head_tiles(lean)
    try:
        out = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, temperature, chunk, None, 1.0, OUTPUTS
        )
        logprobs, entropy = out[0], out[1]
        scale = torch.rand(n, generator=g) - 0.3  # gradients of both signs
        loss = (logprobs * scale).sum() + (entropy.sum() * 0.1 if entropy_in_loss else 0.0)
        loss.backward()
    finally:
        lean_head_tiles(True)
    return [*(x.detach() if x is not None else None for x in out), hidden.grad, weight.grad]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [301, 64, 7])  # one tile, several, and targets far from the first tile
def test_same_bits_as_trls_tiles(temperature: float, chunk: int) -> None:
    trl = _run(False, temperature, chunk, entropy_in_loss=False)
    lean = _run(True, temperature, chunk, entropy_in_loss=False)
    names = ["logprobs", *OUTPUTS, "grad hidden", "grad weight"]
    for name, a, b in zip(names, trl, lean, strict=True):
        assert torch.equal(_bits(a), _bits(b)), name
    is_top1 = trl[4]
    assert not is_top1[0] and is_top1[1]  # the tie: the earlier of two equal logits is the top-1
    assert 0 < int(is_top1.sum()) < len(is_top1)


def test_an_entropy_gradient_goes_to_trls_own_backward() -> None:
    trl = _run(False, 1.0, 64, entropy_in_loss=True)
    lean = _run(True, 1.0, 64, entropy_in_loss=True)
    for a, b in zip(trl, lean, strict=True):
        assert torch.equal(_bits(a), _bits(b))


def test_a_wrong_fold_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above can fail: one token's logit gradients off by 1e-5 of themselves are seen, which ``allclose``
    would let pass."""
    from cellduality.train import head_tiles

    original = head_tiles._backward_tile

    def skewed(tile, *args, **kwargs):
        original(tile, *args, **kwargs)
        tile[0] *= 1 + 1e-5

    trl = _run(False, 1.0, 301, entropy_in_loss=False)
    lean_head_tiles(False)
    monkeypatch.setattr(head_tiles, "_backward_tile", skewed)
    try:
        wrong = _run(True, 1.0, 301, entropy_in_loss=False)
    finally:
        lean_head_tiles(False)
        monkeypatch.undo()
        lean_head_tiles(True)
    assert torch.equal(_bits(trl[0]), _bits(wrong[0]))  # the forward is untouched
    assert not torch.equal(_bits(trl[-1]), _bits(wrong[-1])) and torch.allclose(
        trl[-1], wrong[-1], rtol=1e-4, atol=1e-7
    )


def test_switch_is_idempotent_and_reversible(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.kernels import chunked_logprob as kernels

    from cellduality.train import head_tiles

    lean_head_tiles(False)
    original = kernels._forward_tile, kernels._backward_tile
    assert original[0] is not head_tiles._forward_tile
    assert lean_head_tiles(True) and kernels._forward_tile is head_tiles._forward_tile
    assert lean_head_tiles(True) and head_tiles._original["_forward_tile"] is original[0]  # not wrapped twice
    assert not lean_head_tiles(False) and (kernels._forward_tile, kernels._backward_tile) == original
    monkeypatch.setenv("CELLDUALITY_LEAN_HEAD_TILES", "0")
    assert not lean_head_tiles() and kernels._forward_tile is original[0]
    monkeypatch.setenv("CELLDUALITY_LEAN_HEAD_TILES", "1")
    assert lean_head_tiles() and kernels._backward_tile is head_tiles._backward_tile
