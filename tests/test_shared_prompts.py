"""GRPO on the CPU with each shared prompt passed once: the same log-probabilities, entropies, gradients
and rollouts as TRL's own path (cellduality.train.shared_prompts)."""

from __future__ import annotations

import pytest
import torch

from cellduality.train import shared_prompts
from cellduality.train.shared_prompts import SharedPromptGRPOTrainer, generate_with_shared_prefill


def _model(attention: str = "sdpa"):
    from transformers import LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from cellduality.modeling.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config(300, hidden_size=32, num_layers=2)
    config._attn_implementation = attention
    model = LlamaForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    return model


def _batch(logits_to_keep: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts (two left-padded) with 3, 1 and 2 completions of several lengths, rows interleaved."""
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 300, (3, 12), generator=gen)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[1, :4] = 0
    prompt_mask[2, :1] = 0
    prompts = prompts.masked_fill(prompt_mask == 0, 0)
    owners = [0, 1, 0, 2, 0, 2]
    completions = torch.randint(3, 300, (len(owners), logits_to_keep), generator=gen)
    completion_mask = torch.ones_like(completions)
    for row, stop in enumerate([9, 4, 7, 9, 1, 5]):  # a completion ends at its EOS: the rest is padding
        completion_mask[row, stop:] = 0
    ids = torch.cat([prompts[owners], completions.masked_fill(completion_mask == 0, 0)], dim=1)
    return ids, torch.cat([prompt_mask[owners], completion_mask], dim=1)


def _trainer() -> SharedPromptGRPOTrainer:
    from accelerate import Accelerator

    trainer = SharedPromptGRPOTrainer.__new__(SharedPromptGRPOTrainer)  # the two methods need only this
    trainer.accelerator = Accelerator(cpu=True)
    return trainer


def _logps(method, model, ids, mask, keep=9, batch_size=None):
    model.zero_grad()
    logps, entropy, _ = method(
        _trainer(), model, ids, mask, keep, batch_size=batch_size, compute_entropy=True
    )
    (logps * mask[:, -keep:]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), entropy.detach(), grads


def test_prompt_groups_follow_tokens_and_padding() -> None:
    ids = torch.tensor([[0, 5, 6], [5, 5, 6], [0, 5, 6], [5, 5, 6], [0, 0, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1]])
    assert shared_prompts.prompt_groups(ids, mask) == [[0, 2], [1, 3], [4]]
    other_mask = mask.clone()
    other_mask[2, 0] = 1  # same tokens, other padding: another prompt
    assert shared_prompts.prompt_groups(ids, other_mask) == [[0], [1, 3], [2], [4]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_packed_logps_entropies_and_gradients_are_trls(attention: str, batch_size: int | None) -> None:
    from trl import GRPOTrainer

    model = _model(attention)
    ids, mask = _batch()
    trl_logps, trl_entropy, trl_grads = _logps(
        GRPOTrainer._get_per_token_logps_and_entropies, model, ids, mask, batch_size=batch_size
    )
    logps, entropy, grads = _logps(
        SharedPromptGRPOTrainer._get_per_token_logps_and_entropies, model, ids, mask, batch_size=batch_size
    )
    keep = mask[:, -9:].bool()
    assert (trl_logps[~keep] == 0).all() and (logps[~keep] == 0).all()  # padding scores nothing, as in TRL
    assert torch.allclose(logps, trl_logps, atol=1e-5), (logps - trl_logps).abs().max()
    assert torch.allclose(entropy[keep], trl_entropy[keep], atol=1e-5)
    assert grads.keys() == trl_grads.keys() and grads
    for name, grad in trl_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_a_segment_that_sees_another_completion_changes_the_logps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above has the power to fail: a mask that lets a segment see its neighbours'
    tokens (a packing bug) moves the log-probabilities far beyond the tolerance."""
    from trl import GRPOTrainer

    model = _model()
    ids, mask = _batch()
    trl_logps = _logps(GRPOTrainer._get_per_token_logps_and_entropies, model, ids, mask)[0]
    pack = shared_prompts.pack

    def leaky(*args, **kwargs):
        packed = pack(*args, **kwargs)
        width = packed["input_ids"].size(1)
        packed["attention_mask"] = (
            torch.ones(width, width).tril().bool()[None, None].expand_as(packed["attention_mask"])
        )
        return packed

    monkeypatch.setattr(shared_prompts, "pack", leaky)
    leaked = _logps(SharedPromptGRPOTrainer._get_per_token_logps_and_entropies, model, ids, mask)[0]
    assert (leaked - trl_logps).abs().max() > 1e-3


def test_switched_off_or_nothing_shared_takes_trls_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    model = _model()
    ids, mask = _batch()
    original = shared_prompts.pack
    monkeypatch.setattr(shared_prompts, "pack", lambda *a, **k: calls.append(1) or original(*a, **k))
    _logps(SharedPromptGRPOTrainer._get_per_token_logps_and_entropies, model, ids[[0, 1, 3]], mask[[0, 1, 3]])
    assert not calls  # three rows, three prompts
    monkeypatch.setenv("CELLDUALITY_SHARED_PROMPTS", "0")
    _logps(SharedPromptGRPOTrainer._get_per_token_logps_and_entropies, model, ids, mask)
    assert not calls
    monkeypatch.delenv("CELLDUALITY_SHARED_PROMPTS")
    _logps(SharedPromptGRPOTrainer._get_per_token_logps_and_entropies, model, ids, mask)
    assert calls == [1]


@pytest.mark.parametrize("cache", ["static", None])
def test_shared_prefill_gives_the_same_rollouts(cache: str | None) -> None:
    from transformers import GenerationConfig

    model = _model().eval()
    ids, mask = _batch()
    prompt_ids, prompt_mask = ids[:, :12], mask[:, :12]
    config = GenerationConfig(
        max_new_tokens=10,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        pad_token_id=0,
        eos_token_id=2,
        cache_implementation=cache,
    )
    with torch.no_grad():
        torch.manual_seed(3)
        plain = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        torch.manual_seed(3)
        shared = generate_with_shared_prefill(model, model.generate, prompt_ids, prompt_mask, config)
        torch.manual_seed(4)
        other_seed = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config
        )
    assert torch.equal(shared, plain)
    assert not torch.equal(other_seed, plain)  # the comparison can fail: draws do change the tokens
    assert config.cache_implementation == cache  # the caller's configuration is left as it was
