"""A Llama model's decoding steps on the CPU without the module machinery: Hugging Face's tokens, fewer
Python calls per token.

Why: on the CPU a decoding step of the demo's 4-layer model is about 300 tiny operations, and a good
part of its time was Python around them: ``nn.Module.__call__`` for each of some 50 modules, the
output-capturing and config-merging decorators, configuration attribute look-ups. The demo's GRPO step
decodes about 80 tokens (40 for the rollouts, two greedy dual generations of about 20), and evaluation
and the dual check decode the rest. Measured one step at a time on the demo's SFT checkpoint (150-token
prompts, static cache, the model's forward and this step alternating, three runs on the 2-core
machine): 3.0 -> 2.2 ms a step for 4 rows, 4.6-4.9 -> 4.0-4.1 ms for 32 rows.
``benchmarks/train_speed.py`` measures what it does to training.

How: :func:`lean_decoding` gives the model *instance* a ``__call__`` of its own while the ``with`` block
runs. Hugging Face's decoding loop (``GenerationMixin._sample``: ``model_forward = self.__call__``) calls
it for every token after the prefill; the prefill (``self(...)``, which Python looks up on the class)
keeps the model's own forward. A one-token call with the arguments that loop passes runs
:meth:`_LeanCall.step`, which makes the calls ``LlamaForCausalLM.forward`` makes, in its order, on the
same tensors: the embedding, Transformers' own ``create_causal_mask`` and rotary embedding, per layer
Transformers' ``LlamaRMSNorm.forward`` (called as a function, without the module call), the q/k/v
projections, Transformers' ``rotate_half``, the cache's own ``update``, the attention function the
configuration names (``ALL_ATTENTION_FUNCTIONS``; for ``sdpa``, the kernel called with the arguments
Transformers' wrapper gives it for one query token, chosen by that wrapper's own ``use_gqa_in_sdpa``
and ``pack_gqa``), the output projection, the norm again, the gated MLP; the final norm and the head.
So its logits are bit-identical to the model's and the sampled tokens are the same for the same seed
(tests/test_decode.py compares both, static and dynamic cache, greedy and sampled, padded rows).
Any other call (more than one token, other arguments) goes to the model's forward.

:func:`lean_generation` adds inference mode around a whole ``generate`` call where the lean step
applies and the call's cache can be its own (used by the dual's generation and ``inference``; the
rollouts' shared prefill owns its cache already).

Scope (:func:`supported`): a ``LlamaForCausalLM`` built from Transformers' own classes (no subclass, no
PEFT layer in place of a ``Linear``, no module with a forward of its own on its instance, other than
TRL's fused LM head on the model, which decodes through the model's forward), with no hook on any
module (DeepSpeed ZeRO-3 and accelerate's offloading work through hooks), on the CPU, with the default
rotary embedding. Anything else decodes as before. ``CELLDUALITY_LEAN_DECODE=0`` turns it off.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

#: the keyword arguments Hugging Face's decoding loop passes a Llama model for each new token
_STEP_ARGS = frozenset(
    {
        "input_ids",
        "attention_mask",
        "position_ids",
        "past_key_values",
        "use_cache",
        "logits_to_keep",
        "return_dict",
    }
)


#: decoding steps this process took through the lean step (tests check that training takes the path)
steps_taken = 0


def enabled() -> bool:
    """On unless ``CELLDUALITY_LEAN_DECODE=0``."""
    return os.environ.get("CELLDUALITY_LEAN_DECODE", "1") != "0"


def supported(model: Any) -> bool:
    """Whether :meth:`_LeanCall.step` computes exactly what ``model``'s forward does (see the module's scope)."""
    try:
        from transformers.models.llama import modeling_llama as ml
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    if type(model) is not ml.LlamaForCausalLM or type(model.model) is not ml.LlamaModel:
        return False
    own_forward = vars(model).get("forward")
    if own_forward is not None and not _is_trls_fused_head(own_forward):
        return False
    inner = model.model
    if type(inner.rotary_emb) is not ml.LlamaRotaryEmbedding or inner.rotary_emb.rope_type != "default":
        return False
    if type(inner.embed_tokens) is not torch.nn.Embedding or type(inner.norm) is not ml.LlamaRMSNorm:
        return False
    if type(model.lm_head) is not torch.nn.Linear or model.lm_head.weight.device.type != "cpu":
        return False
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (
            type(layer) is not ml.LlamaDecoderLayer
            or type(attn) is not ml.LlamaAttention
            or type(mlp) is not ml.LlamaMLP
            or type(layer.input_layernorm) is not ml.LlamaRMSNorm
            or type(layer.post_attention_layernorm) is not ml.LlamaRMSNorm
        ):
            return False
        linears = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
        )
        if any(type(lin) is not torch.nn.Linear for lin in linears):
            return False
    if any("forward" in vars(m) for m in inner.modules()):  # a module patched on its instance
        return False
    hooked = (
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
        for m in model.modules()
    )
    if any(hooked):
        return False
    from torch.nn.modules import module as nn_module

    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    return not any(getattr(nn_module, name, None) for name in global_hooks)


def _is_trls_fused_head(forward: Any) -> bool:
    """Whether an instance ``forward`` is TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``),
    which GRPO and SFT put on the model: without ``fused_lm_head=True`` (never passed when decoding) it
    calls the model's own forward."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:  # pragma: no cover - TRL is a dependency
        return False
    code = getattr(getattr(forward, "__func__", None), "__code__", None)  # functools.wraps hides the names
    if code is None or code.co_name != "_fused_forward":
        return False
    try:
        same_file = os.path.samefile(code.co_filename, trl_utils.__file__)
    except OSError:
        return False
    return same_file and getattr(forward.__func__, "__wrapped__", None) is type(forward.__self__).forward


class _Layer(NamedTuple):
    """One decoder layer's tensors and settings, read once per ``with`` block (no module look-ups)."""

    attn: Any
    index: int
    head_dim: int
    norm1: Any  # the LlamaRMSNorm modules, run through their class's forward (no ``__call__``)
    q: torch.Tensor
    q_bias: torch.Tensor | None
    k: torch.Tensor
    k_bias: torch.Tensor | None
    v: torch.Tensor
    v_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    norm2: Any
    act: Any  # None: Transformers' SiLUActivation, whose forward is ``F.silu``
    gate: torch.Tensor
    gate_bias: torch.Tensor | None
    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None

    @classmethod
    def of(cls, layer: Any) -> _Layer:
        from transformers.activations import SiLUActivation

        attn, mlp = layer.self_attn, layer.mlp
        act = mlp.act_fn
        plain_silu = type(act) is SiLUActivation and "forward" not in vars(act)
        return cls(
            attn,
            attn.layer_idx,
            attn.head_dim,
            layer.input_layernorm,
            attn.q_proj.weight,
            attn.q_proj.bias,
            attn.k_proj.weight,
            attn.k_proj.bias,
            attn.v_proj.weight,
            attn.v_proj.bias,
            attn.o_proj.weight,
            attn.o_proj.bias,
            layer.post_attention_layernorm,
            None if plain_silu else act,
            mlp.gate_proj.weight,
            mlp.gate_proj.bias,
            mlp.up_proj.weight,
            mlp.up_proj.bias,
            mlp.down_proj.weight,
            mlp.down_proj.bias,
        )


class _LeanCall:
    """The instance ``__call__`` :func:`lean_decoding` installs: one-token steps through :meth:`step`.

    It reads the modules' tensors once, when the ``with`` block starts (an optimizer updates them in
    place, so they stay the model's own); the attention's ``training`` flag is read at each step."""

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import pack_gqa, use_gqa_in_sdpa
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_outputs import CausalLMOutputWithPast
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
        from transformers.models.llama import modeling_llama as ml

        self.model = model
        self.steps = 0  # decoding steps taken through ``step`` (a test checks that the path is taken)
        inner = model.model
        self.config = inner.config
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = inner.norm
        self.head = model.lm_head
        self.layers = [_Layer.of(layer) for layer in inner.layers[: self.config.num_hidden_layers]]
        self.attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, ml.eager_attention_forward
        )
        #: Transformers' sdpa attention for one query token, without its wrapper's other branches
        self.direct_sdpa = self.attention is ALL_ATTENTION_FUNCTIONS.get("sdpa")
        self._mask = create_causal_mask
        self._output = CausalLMOutputWithPast
        self._slice = slice_logits_to_keep
        self._use_gqa, self._pack_gqa = use_gqa_in_sdpa, pack_gqa
        #: Transformers' own RMSNorm and rotation, called as functions: the same code, no module call
        self._rms, self._rotate_half = ml.LlamaRMSNorm.forward, ml.rotate_half

    def _sdpa(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> Any:
        """``sdpa_attention_forward`` for one query token on the CPU: its own decisions (GQA in the kernel
        when there is no mask, else the query's heads packed per key head), then its output layout."""
        kwargs: dict[str, Any] = {}
        if attn.num_key_value_groups > 1:
            if self._use_gqa(mask, key, value):
                kwargs["enable_gqa"] = True
            else:
                query = self._pack_gqa(query, attn.num_key_value_groups)
                mask = self._pack_gqa(mask, attn.num_key_value_groups)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0 if not attn.training else attn.attention_dropout,
            scale=attn.scaling,
            is_causal=False,
            **kwargs,
        )
        return out.reshape(out.shape[0], -1, 1, value.shape[-1]).transpose(1, 2).contiguous()

    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Any,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> Any:
        """One decoding step of ``LlamaForCausalLM.forward`` (one token per row, a cache, positions)."""
        embed = self.embed
        hidden = F.embedding(
            input_ids,
            embed.weight,
            embed.padding_idx,
            embed.max_norm,
            embed.norm_type,
            embed.scale_grad_by_freq,
            embed.sparse,
        )
        mask = self._mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
        )
        cos, sin = self.rotary(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # as apply_rotary_pos_emb does, once for all layers
        batch, length = hidden.shape[:2]
        for lay in self.layers:
            attn = lay.attn
            residual = hidden
            hidden = self._rms(lay.norm1, hidden)
            shape = (batch, length, -1, lay.head_dim)
            query = F.linear(hidden, lay.q, lay.q_bias).view(shape).transpose(1, 2)
            key = F.linear(hidden, lay.k, lay.k_bias).view(shape).transpose(1, 2)
            value = F.linear(hidden, lay.v, lay.v_bias).view(shape).transpose(1, 2)
            query = (query * cos) + (self._rotate_half(query) * sin)
            key = (key * cos) + (self._rotate_half(key) * sin)
            key, value = cache.update(key, value, lay.index)
            if self.direct_sdpa and length == 1:
                out = self._sdpa(attn, query, key, value, mask)
            else:
                out, _ = self.attention(
                    attn,
                    query,
                    key,
                    value,
                    mask,
                    dropout=0.0 if not attn.training else attn.attention_dropout,
                    scaling=attn.scaling,
                    position_ids=position_ids,
                )
            out = out.reshape(batch, length, -1).contiguous()
            hidden = residual + F.linear(out, lay.o, lay.o_bias)
            residual = hidden
            hidden = self._rms(lay.norm2, hidden)
            gate = F.linear(hidden, lay.gate, lay.gate_bias)
            gate = F.silu(gate) if lay.act is None else lay.act(gate)
            hidden = residual + F.linear(
                gate * F.linear(hidden, lay.up, lay.up_bias), lay.down, lay.down_bias
            )
        hidden = self._rms(self.norm, hidden)
        logits = F.linear(self._slice(hidden, logits_to_keep), self.head.weight, self.head.bias)
        return self._output(logits=logits, past_key_values=cache)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids")
        if (
            args
            or not set(kwargs) <= _STEP_ARGS
            or ids is None
            or ids.dim() != 2
            or ids.size(1) != 1
            or ids.device.type != "cpu"
            or kwargs.get("past_key_values") is None
            or kwargs.get("position_ids") is None
            or kwargs.get("use_cache") is False
            or kwargs.get("return_dict") is False
        ):
            return type(self.model).__call__(self.model, *args, **kwargs)
        global steps_taken
        self.steps += 1
        steps_taken += 1
        return self.step(
            ids,
            kwargs.get("attention_mask"),
            kwargs["position_ids"],
            kwargs["past_key_values"],
            kwargs.get("logits_to_keep", 0),
        )


@contextmanager
def lean_decoding(model: Any) -> Iterator[_LeanCall | None]:
    """While the block runs, ``model.generate`` decodes through :meth:`_LeanCall.step` (yields the
    ``_LeanCall``, whose ``steps`` counts them), when :func:`enabled` and :func:`supported`; otherwise
    yields None and changes nothing. Leaves an instance ``__call__`` someone else installed alone."""
    if not enabled() or "__call__" in vars(model) or not supported(model):
        yield None
        return
    call = _LeanCall(model)
    object.__setattr__(model, "__call__", call)
    try:
        yield call
    finally:
        object.__delattr__(model, "__call__")


@contextmanager
def lean_generation(model: Any) -> Iterator[dict[str, Any]]:
    """A ``generate`` call's context: :func:`lean_decoding`, under ``torch.no_grad``; and when the lean
    step applies and Hugging Face would make a dynamic cache (no ``cache_implementation``), inference
    mode instead, with the call's own ``DynamicCache``. Yields the keyword arguments to add to
    ``generate`` (the cache, or nothing).

    Why the conditions: inference mode makes every operation cheaper (5-12% of a generation), but a
    tensor made in it must not outlive the call where autograd or an in-place update outside it would
    meet it. A cache the call owns dies with it; a static cache Hugging Face keeps on the model for
    the next call would not, and under DeepSpeed or PEFT (where the lean step does not apply) the
    hooks' own tensors could. The caller keeps only what it copies out (token lists)."""
    with lean_decoding(model) as call:
        if call is None or getattr(model.generation_config, "cache_implementation", None) is not None:
            with torch.no_grad():
                yield {}
            return
        from transformers import DynamicCache

        with torch.inference_mode():
            yield {"past_key_values": DynamicCache(config=model.config)}


__all__ = ["enabled", "lean_decoding", "lean_generation", "supported"]
