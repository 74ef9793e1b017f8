"""A Llama model's decoding steps without the module machinery (cellduality.modeling.decode): bit-identical
logits, the same generated tokens as Hugging Face's ``generate``, and the path is really taken."""

from __future__ import annotations

import pytest
import torch

from cellduality.modeling import decode
from cellduality.modeling.decode import lean_decoding, supported


def _model(attention: str = "sdpa", num_kv_heads: int = 2, seed: int = 0):
    from transformers import GenerationConfig, LlamaForCausalLM

    from cellduality.modeling.tiny import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=num_kv_heads)
    config._attn_implementation = attention
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Four prompts, three of them left-padded by different amounts."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (4, 11), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 4, 1, 7]):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _generate(model, lean: bool, seed: int = 5, **settings):
    ids, mask = _prompts()
    kwargs = {"max_new_tokens": 12, "pad_token_id": 0, **settings}
    torch.manual_seed(seed)
    with torch.no_grad():
        if not lean:
            return model.generate(input_ids=ids, attention_mask=mask, **kwargs), None
        with lean_decoding(model) as call:
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out, call


SETTINGS = {
    "greedy": {"do_sample": False},
    "sampled": {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    "sampled, warped": {"do_sample": True, "temperature": 0.7, "top_k": 50, "top_p": 0.9},
}


CASES = [("sdpa", 2, name, cache) for name in sorted(SETTINGS) for cache in ("static", None)] + [
    ("sdpa", 4, "sampled", "static"),  # as many key/value heads as query heads: no GQA packing
    ("sdpa", 4, "greedy", None),
    ("eager", 2, "sampled", "static"),  # Transformers' eager attention, through its own function
    ("eager", 2, "greedy", None),
]


@pytest.mark.parametrize("attention,kv_heads,name,cache", CASES)
def test_generate_gives_hugging_faces_tokens(
    attention: str, kv_heads: int, name: str, cache: str | None
) -> None:
    model = _model(attention, kv_heads)
    assert supported(model)
    settings = {**SETTINGS[name], "cache_implementation": cache}
    expected, _ = _generate(model, lean=False, **settings)
    got, call = _generate(model, lean=True, **settings)
    assert call is not None and call.steps == 11  # every token after the prefill's first one
    assert torch.equal(got, expected)
    assert "__call__" not in vars(model)  # the instance is as it was
    if name != "greedy":  # the comparison can fail: another seed draws other tokens
        other, _ = _generate(model, lean=True, seed=6, **settings)
        assert not torch.equal(other, expected)


def _one_step(model):
    """One decoding step after the same prefill, through the model's forward and through the lean step:
    both steps' logits and both caches."""
    from transformers import DynamicCache

    ids, mask = _prompts()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    token = torch.tensor([[7], [8], [9], [10]])
    full = torch.cat([mask, torch.ones(4, 1, dtype=mask.dtype)], dim=1)
    step = {"input_ids": token, "attention_mask": full, "position_ids": positions[:, -1:] + 1}
    out = []
    with torch.no_grad():
        for lean in (False, True):
            cache = DynamicCache(config=model.config)
            model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            if lean:
                with lean_decoding(model) as call:
                    logits = model.__call__(
                        **step, past_key_values=cache, use_cache=True, logits_to_keep=1
                    ).logits
                assert call.steps == 1
            else:
                logits = model(**step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            out.append((logits, cache))
    return out


def test_a_step_is_bit_identical_to_the_models_forward() -> None:
    (expected, cache), (got, lean_cache) = _one_step(_model())
    assert torch.equal(got, expected)
    for a, b in zip(cache.layers, lean_cache.layers, strict=True):  # the cache moved the same way
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_step_that_skews_a_projection_is_caught(monkeypatch) -> None:
    """The comparison above is sharp: a step whose query projection is off by 1e-6 differs."""
    real = decode._Layer.of

    def skewed(layer):  # the lean step's own copy of a query weight, off by one part in a million
        tensors = real(layer)
        return tensors._replace(q=tensors.q * (1 + 1e-6))

    monkeypatch.setattr(decode._Layer, "of", skewed)
    (expected, _), (got, _) = _one_step(_model())
    assert not torch.equal(got, expected)
    assert torch.allclose(got, expected, atol=1e-4)  # close: only the comparison's sharpness is tested


def test_out_of_scope_models_decode_as_before() -> None:
    from peft import LoraConfig, get_peft_model

    hooked = _model()
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    assert not supported(hooked)
    patched = _model()
    norm = patched.model.layers[1].post_attention_layernorm
    norm.forward = lambda hidden: type(norm).forward(norm, hidden) * 2  # another norm than the class's
    assert not supported(patched)
    peft = get_peft_model(_model(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert not supported(peft.get_base_model())  # LoRA layers stand where the Linear layers were
    for model in (hooked, patched, peft.get_base_model()):
        expected, _ = _generate(model, lean=False, do_sample=False)
        got, call = _generate(model, lean=True, do_sample=False)
        assert call is None and torch.equal(got, expected)


def test_trls_fused_head_is_in_scope_another_forward_is_not() -> None:
    """GRPO and SFT add TRL's fused LM head (an instance ``forward``), which decodes through the model's
    own forward: still in scope, the same tokens. Any other instance ``forward`` is out of scope."""
    import types

    from trl.trainer.utils import add_fused_lm_head

    model = _model()
    expected, _ = _generate(model, lean=False, do_sample=False)
    add_fused_lm_head(model)
    assert supported(model)
    got, call = _generate(model, lean=True, do_sample=False)
    assert call is not None and call.steps > 0 and torch.equal(got, expected)
    other = _model()
    other.forward = types.MethodType(lambda self, *a, **k: type(self).forward(self, *a, **k), other)
    assert not supported(other)


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CELLDUALITY_LEAN_DECODE", "0")
    _, call = _generate(_model(), lean=True, do_sample=False)
    assert call is None


def test_lean_generation_owns_its_cache_in_inference_mode_and_keeps_the_tokens() -> None:
    """Inference mode only where the generation's cache is the call's own: the same tokens as
    Hugging Face's ``generate`` under ``no_grad``, and nothing of it left on the model."""
    from cellduality.modeling.decode import lean_generation

    ids, mask = _prompts()
    for attention, static in (("sdpa", False), ("sdpa", True), ("eager", False)):
        model = _model(attention)
        if static:
            model.generation_config.cache_implementation = "static"
        with torch.no_grad():
            expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        with lean_generation(model) as cache:
            assert torch.is_inference_mode_enabled() == (not static)
            assert bool(cache) == (not static)
            got = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, **cache
            )
        assert got.tolist() == expected.tolist()
        assert not any(p.is_inference() for p in model.parameters())
    hooked = _model()
    hooked.model.norm.register_forward_hook(lambda *a: None)
    with lean_generation(hooked) as cache:  # out of scope: as before, no_grad and Hugging Face's cache
        assert cache == {} and not torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
