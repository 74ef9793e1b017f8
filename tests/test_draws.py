"""torch.multinomial's own draws with bulk exponential variates: every token and the generator's state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellduality.modeling import draws as td
from cellduality.modeling.draws import exact_multinomial, exponential_variates, torch_draws


def _probs(rows: int, vocab: int, seed: int, zeros: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(rows, vocab, generator=g) * 3, -1)
    if zeros:  # top-k / top-p leave zeros, which must never be drawn
        probs[:, ::3] = 0
    return probs


def test_same_variates_and_generator_state_as_exponential_() -> None:
    """30 x 128,928 variates (the demo's 32 rows x 4,029 words): every float32 the same bits, and the
    generator in the same state after each call."""
    for seed in range(30):
        g_torch, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        theirs = torch.empty(32, 4029).exponential_(generator=g_torch)
        ours = exponential_variates((32, 4029), g_ours)
        assert torch.equal(theirs.view(torch.int32), ours.view(torch.int32)), seed
        assert torch.equal(g_torch.get_state(), g_ours.get_state()), seed


def test_same_tokens_as_torch_multinomial_from_both_generators() -> None:
    for seed in range(20):
        probs = _probs(32, 4029, seed, zeros=seed % 2 == 0)
        g_torch, g_ours = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        theirs = torch.multinomial(probs, 1, generator=g_torch)
        ours = exact_multinomial(probs, 1, generator=g_ours)
        assert ours.shape == (32, 1) and ours.dtype == torch.int64
        assert torch.equal(theirs, ours) and torch.equal(g_torch.get_state(), g_ours.get_state())
        if seed % 2 == 0:
            assert not bool((ours % 3 == 0).any())  # a zero-probability word is never drawn
    # the default generator, as transformers calls it, and unnormalised weights
    weights = _probs(5, 300, 1) * 7
    torch.manual_seed(11)
    theirs = [torch.multinomial(weights, 1) for _ in range(5)]
    torch.manual_seed(11)
    ours = [exact_multinomial(weights, 1) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    assert (
        len({tuple(t.view(-1).tolist()) for t in ours}) > 1
    )  # the draws move on: another seed, other tokens


def test_values_next_to_a_float32_midpoint_are_the_c_librarys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Doubles within a few units of a midpoint between two float32 values round as the C library's log1p
    (torch's) rounds, even from a vectorised log1p that is off in its last bits. Here numpy's log1p is
    made 4 units off on purpose: alone it rounds some of these to the other float; with the second look
    every value is the C library's; without it (no margin) they differ again."""
    midpoints = []
    for x in (0.1, 0.7, 1.3, 2.9, 5.5, 11.0, 23.0):
        f = np.float32(x)
        midpoints.append((float(f) + float(np.nextafter(f, np.float32(np.inf)))) / 2)
    bits = []
    for m in midpoints:  # the uniforms whose -log1p(-u) land around each midpoint
        centre = round(-math.expm1(-m) * 2.0**53)
        bits += [centre + k for k in range(-3000, 3001)]
    bits = np.array(bits, dtype=np.int64)
    u = bits * 2.0**-53
    c_library = np.array([np.float32(-math.log1p(-x)) for x in u.tolist()], dtype=np.float32).view(np.int32)
    assert np.array_equal(td._variates_from_bits(bits.copy()).view(np.int32), c_library)

    log1p = np.log1p

    def off(x, out=None):
        result = log1p(x, out=out)
        result *= 1 + 2.0**-50  # about 4 units in the last place
        return result

    monkeypatch.setattr(np, "log1p", off)
    alone = (-np.log1p(-u)).astype(np.float32).view(np.int32)
    assert not np.array_equal(alone, c_library)
    assert np.array_equal(td._variates_from_bits(bits.copy()).view(np.int32), c_library)
    monkeypatch.setattr(td, "_MARGIN", 0)
    assert not np.array_equal(td._variates_from_bits(bits.copy()).view(np.int32), c_library)


def test_other_calls_are_torchs_own() -> None:
    probs = _probs(4, 50, 0)
    for args, kwargs in (
        ((probs.double(), 1), {}),  # float64
        ((probs[0], 1), {}),  # 1-D
        ((probs, 3), {}),  # several samples
        ((probs, 2), {"replacement": True}),
    ):
        g_torch, g_ours = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        assert torch.equal(
            torch.multinomial(*args, **kwargs, generator=g_torch),
            exact_multinomial(*args, **kwargs, generator=g_ours),
        )
    bad = probs.clone()
    bad[1] = 0  # a row without weight: torch's own error
    with pytest.raises(RuntimeError, match="invalid multinomial distribution"):
        exact_multinomial(bad, 1)
    bad[1, 0] = -1.0
    with pytest.raises(RuntimeError, match="probability tensor contains either"):
        exact_multinomial(bad, 1)


def test_block_installs_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    original = torch.multinomial
    with torch_draws(True):
        assert torch.multinomial is exact_multinomial
        with torch_draws(True):
            assert torch.multinomial is exact_multinomial
        assert torch.multinomial is exact_multinomial  # an inner block leaves it in place
    assert torch.multinomial is original
    with pytest.raises(ValueError), torch_draws(True):
        raise ValueError("the block's own error")
    assert torch.multinomial is original
    monkeypatch.setenv("CELLDUALITY_FAST_DRAWS", "0")
    with torch_draws():
        assert torch.multinomial is original
    with torch_draws(False):
        assert torch.multinomial is original
