"""TRL's fused LM head on the CPU, projecting labelled positions only: same loss, same gradients."""

from __future__ import annotations

import pytest
import torch

from cellduality.train.lm_head import compact_lm_head


def _loss_and_grads(compact: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    from transformers import LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from cellduality.modeling.tiny import tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(300, hidden_size=32, num_layers=2))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(3, 300, (4, 23))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :16] = -100  # the prompt: no label, as in completion-only SFT and GRPO
    compact_lm_head(compact)
    try:
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    finally:
        compact_lm_head(True)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.log_probs.detach(), grads


def test_compact_head_gives_the_same_loss_and_gradients() -> None:
    loss_all, logps_all, grads_all = _loss_and_grads(False)
    loss_compact, logps_compact, grads_compact = _loss_and_grads(True)
    assert torch.allclose(loss_all, loss_compact, rtol=1e-6, atol=1e-7)
    assert torch.allclose(logps_all, logps_compact, rtol=1e-5, atol=1e-6)
    assert grads_all.keys() == grads_compact.keys() and grads_all
    for name, grad in grads_all.items():
        assert torch.allclose(grad, grads_compact[name], rtol=1e-4, atol=1e-7), name


def test_switch_is_idempotent_and_reversible(monkeypatch: pytest.MonkeyPatch) -> None:
    from trl.trainer import utils as trl_utils

    cpu, meta = torch.device("cpu"), torch.device("meta")
    compact_lm_head(False)
    original = trl_utils._use_triton
    assert not original(cpu)
    assert compact_lm_head(True) and trl_utils._use_triton(cpu)
    wrapped = trl_utils._use_triton
    compact_lm_head(True)
    assert trl_utils._use_triton is wrapped  # not wrapped twice
    assert trl_utils._use_triton(meta) == original(meta)  # other devices: TRL's own answer
    assert not compact_lm_head(False) and trl_utils._use_triton is original
    monkeypatch.setenv("CELLDUALITY_COMPACT_LM_HEAD", "0")
    assert not compact_lm_head() and trl_utils._use_triton is original
    monkeypatch.setenv("CELLDUALITY_COMPACT_LM_HEAD", "1")
    assert compact_lm_head() and trl_utils._use_triton(cpu)
