"""GRPO on the CPU passes each prompt once for all the completions that share it: in the loss forward
and in the rollouts' prefill.

Why: a GRPO batch holds ``num_generations`` completions of each prompt (8 in the demo), and TRL scores
them as 32 rows of prompt + completion, so the forward and backward pass through every prompt 8 times.
The demo's prompts are about 150 tokens and its completions 40: three quarters of the trunk's tokens
are copies. Here the rows that share a prompt become one packed sequence,

    prompt[:-1] | prompt[-1], completion_1[:-1] | prompt[-1], completion_2[:-1] | ...

with a block attention mask (each segment sees the prompt and itself, causally) and the positions the
unpacked rows have. The prompt's last token opens every segment, so its hidden state, which predicts a
completion's first token, is computed per segment from the same keys as in the unpacked row; each
segment's labels are its completion's tokens (``shift_labels``, already shifted), scored by TRL's fused
LM head. Every log-probability and entropy is the unpacked row's up to the order of floating-point
sums, and so are the loss and its gradients: tests/test_shared_prompts.py compares both with TRL's own
path. The demo's trunk sees 4 x 470 tokens instead of 32 x 190 (``benchmarks/train_speed.py``).

The rollouts (:func:`generate_with_shared_prefill`): the KV cache of each distinct prompt is computed
once and copied to its rows before ``generate`` samples; the same tokens as without it (the test draws
them with the same seed both ways). Their decoding steps skip the module machinery
(``cellduality.modeling.decode``: bit-identical logits).

Scope: CPU tensors, text-only batches, the ``sdpa`` and ``eager`` attention implementations (which take
a custom 4-D mask), models whose positions are ``0 .. length - 1`` when none are given (TRL passes none),
and batches in which some prompt is shared; anything else takes TRL's path unchanged. One forward per
chunk, as in TRL's path, so every rank calls the model as often as before (DDP, ZeRO). The rollouts'
prefill also needs Hugging Face generation without DeepSpeed (its extra forward must not meet ZeRO-3's
gathers on one rank only) and a completion length. ``CELLDUALITY_SHARED_PROMPTS=0`` turns both off.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any

import torch
from trl import GRPOTrainer

from cellduality.modeling.decode import lean_decoding

#: attention implementations that accept a custom additive 4-D mask as given
_MASKABLE = ("sdpa", "eager")


def enabled() -> bool:
    """On unless ``CELLDUALITY_SHARED_PROMPTS=0`` (the benchmark's "old" setting turns it off)."""
    return os.environ.get("CELLDUALITY_SHARED_PROMPTS", "1") != "0"


def prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """Row indices grouped by identical prompt (tokens and padding), in order of first appearance."""
    key = torch.cat([prompt_ids, prompt_mask.to(prompt_ids.dtype)], dim=1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    groups: dict[int, list[int]] = {}
    for row, group in enumerate(inverse.tolist()):
        groups.setdefault(group, []).append(row)
    return list(groups.values())


def pack(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    groups: list[list[int]],
    additive: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The packed batch of ``groups`` (one sequence each): ids, positions, the 4-D mask (boolean, True
    where a query may see a key; additive in dtype ``additive`` for eager attention), the shifted labels,
    and where each row's completion tokens sit (``index``: a flat position per row and token)."""
    rows, length = input_ids.shape
    prompt = length - logits_to_keep  # the prompt's length, left padding included
    width = prompt - 1 + max(len(g) for g in groups) * logits_to_keep
    n = len(groups)
    ids = input_ids.new_zeros((n, width))
    positions = torch.zeros((n, width), dtype=torch.long, device=input_ids.device)
    labels = torch.full((n, width), -100, dtype=input_ids.dtype, device=input_ids.device)
    real = torch.zeros((n, width), dtype=torch.bool, device=input_ids.device)
    segment = torch.full((n, width), -2, dtype=torch.long, device=input_ids.device)  # -2: filler
    index = torch.zeros((rows, logits_to_keep), dtype=torch.long, device=input_ids.device)
    span = torch.arange(logits_to_keep, device=input_ids.device)
    for g, members in enumerate(groups):
        first = members[0]
        ids[g, : prompt - 1] = input_ids[first, : prompt - 1]
        positions[g, : prompt - 1] = torch.arange(prompt - 1, device=input_ids.device)
        real[g, : prompt - 1] = attention_mask[first, : prompt - 1].bool()
        segment[g, : prompt - 1] = -1
        for k, row in enumerate(members):
            start = prompt - 1 + k * logits_to_keep
            stop = start + logits_to_keep
            ids[g, start:stop] = input_ids[row, prompt - 1 : length - 1]
            positions[g, start:stop] = span + prompt - 1
            real[g, start:stop] = attention_mask[row, prompt - 1 : length - 1].bool()
            segment[g, start:stop] = k
            keep = attention_mask[row, prompt:].bool()
            labels[g, start:stop] = input_ids[row, prompt:].masked_fill(~keep, -100)
            index[row] = g * width + start + span
    order = torch.arange(width, device=input_ids.device)
    causal = order[None, :] <= order[:, None]  # (query, key)
    same = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])
    allowed = causal[None] & same & real[:, None, :]
    allowed |= torch.eye(width, dtype=torch.bool, device=input_ids.device)[None]  # no query sees nothing
    mask = allowed[:, None]
    if additive is not None:
        mask = torch.zeros(mask.shape, dtype=additive, device=input_ids.device).masked_fill_(
            ~mask, torch.finfo(additive).min
        )
    return {
        "input_ids": ids,
        "position_ids": positions,
        "attention_mask": mask,
        "labels": labels,
        "index": index,
    }


def _attention(model: Any) -> str | None:
    inner = getattr(model, "module", model)  # DDP and DeepSpeed hold the model in ``module``
    return getattr(getattr(inner, "config", None), "_attn_implementation", None)


def applicable(model: Any, input_ids: torch.Tensor, extra: dict[str, Any]) -> bool:
    """Whether a batch may take the packed path (see the module's scope)."""
    if not enabled() or input_ids.device.type != "cpu" or any(v is not None for v in extra.values()):
        return False
    return _attention(model) in _MASKABLE


def generate_with_shared_prefill(
    model: Any,
    generate: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    generation_config: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """``generate`` with the KV cache of each distinct prompt computed once and copied to its rows.

    All but a prompt's last token are run once per distinct prompt (at the positions ``generate`` gives
    them: the attention mask's running count), the keys and values copied to every row of that prompt
    (into a static cache when the configuration asks for one), and ``generate`` goes on from there: it
    runs the last prompt token of every row and samples as before, drawing from the random generator
    exactly as without the shared cache, so the same seed gives the same completions up to rounding.
    """
    from transformers import DynamicCache, StaticCache

    groups = prompt_groups(input_ids, attention_mask)
    if len(groups) == input_ids.size(0) or input_ids.size(1) < 2 or generation_config.max_new_tokens is None:
        return generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config, **kwargs
        )
    # inference mode: cheaper operations; no tensor made here outlives the call but the clone returned,
    # and the cache is this call's own (Hugging Face keeps none of it on the model)
    with torch.inference_mode():
        owner = torch.empty(input_ids.size(0), dtype=torch.long, device=input_ids.device)
        for g, members in enumerate(groups):
            owner[members] = g
        firsts = torch.tensor([members[0] for members in groups], device=input_ids.device)
        prefix_ids, prefix_mask = input_ids[firsts, :-1], attention_mask[firsts, :-1]
        positions = (prefix_mask.long().cumsum(-1) - 1).masked_fill(prefix_mask == 0, 0)
        shared = DynamicCache(config=model.config)
        model(
            input_ids=prefix_ids,
            attention_mask=prefix_mask,
            position_ids=positions,
            past_key_values=shared,
            use_cache=True,
            logits_to_keep=1,
        )
        config = copy.deepcopy(generation_config)
        if config.cache_implementation == "static":
            cache: Any = StaticCache(
                config=model.config, max_cache_len=input_ids.size(1) + config.max_new_tokens
            )
        else:
            cache = DynamicCache(config=model.config)
        config.cache_implementation = None  # the cache is given
        for layer, kv in enumerate(shared.layers):
            cache.update(kv.keys[owner], kv.values[owner], layer)
        out = generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            generation_config=config,
            **kwargs,
        )
    # an ordinary tensor again, as TRL's own call returns (TRL asks for the sequences only)
    return out.clone() if isinstance(out, torch.Tensor) else out


class SharedPromptGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` whose per-token log-probabilities pass each shared prompt once (CPU), and
    whose rollouts compute each distinct prompt's KV cache once (CPU, without DeepSpeed)."""

    #: calls that took each shared path: rollouts generated through :func:`generate_with_shared_prefill`
    #: (which prefills once only when some prompt is shared) and packed loss forwards
    shared_prefills: int = 0
    packed_forwards: int = 0

    def _generate_single_turn(  # type: ignore[override]
        self,
        prompt_ids: Any,
        images: Any,
        multimodal_fields: Any,
        num_generations: Any,
        has_tool_images: bool = False,
    ) -> Any:
        args = (prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        if (
            not enabled()
            or self.use_vllm
            or self.use_transformers_continuous_batching
            or self.is_deepspeed_enabled
            or images is not None
            or bool(multimodal_fields)
            or self.accelerator.device.type != "cpu"
        ):
            return super()._generate_single_turn(*args)
        model = self.accelerator.unwrap_model(self.model)
        if "generate" in vars(model):  # someone else's override of this instance: left alone
            return super()._generate_single_turn(*args)
        model.generate = functools.partial(generate_with_shared_prefill, model, model.generate)
        self.shared_prefills += 1
        try:  # TRL's rollout, whose ``unwrapped_model.generate`` is now the shared prefill's
            with lean_decoding(model):
                return super()._generate_single_turn(*args)
        finally:
            del model.generate

    def _get_per_token_logps_and_entropies(  # type: ignore[override]
        self,
        model: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        logits_to_keep: int,
        batch_size: int | None = None,
        compute_entropy: bool = False,
        compute_aux_loss: bool = False,
        **extra: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        prompt = input_ids.size(1) - logits_to_keep
        if compute_aux_loss or prompt < 1 or not applicable(model, input_ids, extra):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **extra,
            )
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):  # TRL's chunks: one forward each
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            groups = prompt_groups(ids[:, :prompt], mask[:, :prompt])
            if len(groups) == ids.size(0):  # nothing shared: TRL's own forward
                logps, entropies, _ = super()._get_per_token_logps_and_entropies(
                    model, ids, mask, logits_to_keep, compute_entropy=compute_entropy
                )
            else:
                additive = None
                if _attention(model) == "eager":  # eager adds the mask to its scores
                    additive = next(p for p in model.parameters() if p.is_floating_point()).dtype
                packed = pack(ids, mask, logits_to_keep, groups, additive)
                index = packed.pop("index")
                labels = packed.pop("labels")
                with self.accelerator.autocast():
                    outputs = model(**packed, shift_labels=labels, fused_lm_head=True)
                self.packed_forwards += 1
                logps = outputs.log_probs.reshape(-1)[index]
                entropies = outputs.entropy.reshape(-1)[index] if compute_entropy else None
            all_logps.append(logps)
            all_entropies.append(entropies)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return logps, entropies, None


__all__ = ["SharedPromptGRPOTrainer", "enabled", "generate_with_shared_prefill", "pack", "prompt_groups"]
