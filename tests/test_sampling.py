"""The CPU sampler (``cellduality.train.sampling``) draws from the distribution torch's does, and
transformers' generation really goes through it while the block is active."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cellduality.train import sampling
from cellduality.train.sampling import inverse_cdf_multinomial, inverse_cdf_sampling

TORCH_MULTINOMIAL = sampling._TORCH_MULTINOMIAL


def _frequencies(weights: torch.Tensor, draws: int, sampler) -> np.ndarray:
    rows = weights.expand(256, -1).contiguous()
    counts = np.zeros(weights.shape[-1])
    for _ in range(draws // 256):
        counts += np.bincount(sampler(rows, 1).view(-1).numpy(), minlength=weights.shape[-1])
    return counts


@pytest.mark.parametrize("scale", [1.0, 7.5])  # weights need not sum to one (as for torch)
def test_draws_follow_the_weights_and_never_a_zero(scale):
    torch.manual_seed(0)
    weights = torch.tensor([0.0, 0.30, 0.0, 0.05, 0.20, 0.001, 0.0, 0.449, 0.0]) * scale
    draws = 256 * 800
    counts = _frequencies(weights, draws, inverse_cdf_multinomial)
    assert counts[weights.numpy() == 0].sum() == 0
    positive = weights.numpy() > 0
    share = weights.double().numpy()[positive] / weights.double().sum().item()
    assert stats.chisquare(counts[positive], share * counts.sum()).pvalue > 1e-4
    # a sampler that is off by one category would fail the same test
    shifted = np.roll(counts, 1)[positive] + 0.5
    assert stats.chisquare(shifted, share * shifted.sum()).pvalue < 1e-10


def test_same_distribution_as_torch_on_a_large_vocabulary():
    """The two samplers' draws of a softmax over 4,000 words: a two-sample test on the categories."""
    torch.manual_seed(1)
    weights = torch.softmax(torch.randn(4000) * 3, dim=-1)
    ours = _frequencies(weights, 256 * 150, inverse_cdf_multinomial)
    theirs = _frequencies(weights, 256 * 150, TORCH_MULTINOMIAL)
    top = np.argsort(-weights.numpy())[:20]  # the categories with enough mass for a chi-square cell
    table = np.stack([ours[top], theirs[top]])
    assert stats.chi2_contingency(table).pvalue > 1e-4


def test_a_rounding_to_the_total_is_clamped_to_the_last_positive_weight(monkeypatch):
    weights = torch.tensor([[0.2, 0.8, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.ones(*shape, dtype=kw.get("dtype")))
    assert inverse_cdf_multinomial(weights, 1).view(-1).tolist() == [1, 0]


def test_one_hot_rows_and_seeded_draws():
    weights = torch.eye(5)[[3, 0, 4]]
    assert inverse_cdf_multinomial(weights, 1).view(-1).tolist() == [3, 0, 4]
    probs = torch.softmax(torch.randn(8, 100), -1)
    first = inverse_cdf_multinomial(probs, 1, generator=torch.Generator().manual_seed(5))
    again = inverse_cdf_multinomial(probs, 1, generator=torch.Generator().manual_seed(5))
    assert first.shape == (8, 1) and first.dtype == torch.long and torch.equal(first, again)


@pytest.mark.parametrize(
    "row", [[0.5, -0.1, 0.6], [0.5, float("nan"), 0.5], [0.0, 0.0, 0.0], [float("inf"), 1.0, 0.0]]
)
def test_rows_torch_rejects_raise_torch_error(row):
    weights = torch.tensor([[0.2, 0.3, 0.5], row])
    with pytest.raises(RuntimeError) as theirs:
        TORCH_MULTINOMIAL(weights, 1)
    with pytest.raises(RuntimeError) as ours:
        inverse_cdf_multinomial(weights, 1)
    assert str(ours.value) == str(theirs.value)


def test_other_calls_go_to_torch():
    probs = torch.full((4, 10), 0.1)
    picked = inverse_cdf_multinomial(probs, 3, replacement=False)  # several samples: torch's own
    assert picked.shape == (4, 3) and all(len(set(r)) == 3 for r in picked.tolist())
    assert inverse_cdf_multinomial(torch.tensor([0.0, 1.0]), 1).tolist() == [1]  # 1-D input


def test_the_block_swaps_and_restores_torch_multinomial():
    assert torch.multinomial is TORCH_MULTINOMIAL
    with inverse_cdf_sampling(True):
        assert torch.multinomial is inverse_cdf_multinomial
        with inverse_cdf_sampling(True):
            pass
        assert torch.multinomial is inverse_cdf_multinomial  # an inner block leaves it in place
    assert torch.multinomial is TORCH_MULTINOMIAL
    with pytest.raises(ValueError), inverse_cdf_sampling(True):
        raise ValueError("an error inside the block")
    assert torch.multinomial is TORCH_MULTINOMIAL
    with inverse_cdf_sampling(False):
        assert torch.multinomial is TORCH_MULTINOMIAL


def test_the_recipe_field_chooses_the_sampler():
    from cellduality.train.configs import CellDualityArguments

    assert CellDualityArguments().cpu_sampler == "torch"  # opt-in: documented seeds keep their draws
    assert CellDualityArguments(cpu_sampler="inverse_cdf").cpu_sampler == "inverse_cdf"
    with pytest.raises(ValueError, match="cpu_sampler must be one of torch, inverse_cdf"):
        CellDualityArguments(cpu_sampler="gumbel")


def test_transformers_sampling_goes_through_it(tmp_path, monkeypatch):
    """One call per generated token while the block is active, none outside it."""
    from transformers import AutoModelForCausalLM

    from cellduality.modeling.tiny import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "m", ["CD3E", "LYZ"]))
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return inverse_cdf_multinomial(*args, **kwargs)

    monkeypatch.setattr(sampling, "inverse_cdf_multinomial", counted)
    ids = torch.tensor([[1, 5, 6]] * 3)
    kwargs = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": True, "pad_token_id": 0}
    model.generate(input_ids=ids, **kwargs)
    assert calls == []
    with inverse_cdf_sampling(True):
        out = model.generate(input_ids=ids, **kwargs)
    assert out.shape == (3, 7) and len(calls) == 4 and calls[0] == (3, model.config.vocab_size)
