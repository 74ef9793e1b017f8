"""The policy's own generation for the dual reward, inside the trainer, safe under several ranks.

``PolicyGenerator`` is the ``generate`` function ``DualReward`` calls once per reward call. It answers
every dual prompt of the batch in one batched generation with the trainer's current weights:

- Hugging Face path: ``model.generate`` inside TRL's ``unwrap_model_for_generation`` (gathers ZeRO-3
  shards, turns gradient checkpointing off so the KV cache works), under ``torch.no_grad`` and in eval
  mode (no dropout), then back to train mode. Dual tokens never reach the loss.
- vLLM path (``use_vllm``): the trainer's own ``vllm_generation.generate``, a collective call.

Rank symmetry: a rank with no dual prompt still generates (one filler prompt) so that collective
operations inside generation (ZeRO-3 gathers, vLLM's gather) happen the same number of times on
every rank. For vLLM, whose server mode slices results by equal per-rank counts, the prompt list is
padded to a fixed length per call (``fixed_batch``).
"""

from __future__ import annotations

from typing import Any

import torch

Messages = list[dict[str, str]]
_FILLER: Messages = [{"role": "user", "content": "."}]


class PolicyGenerator:
    """Callable ``prompts -> completions`` bound to a TRL trainer (set ``trainer`` after building it)."""

    def __init__(
        self,
        tokenizer: Any,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        fixed_batch: int | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.temperature = temperature
        self.fixed_batch = fixed_batch
        self.trainer: Any = None
        self.calls = 0

    def _encode(self, prompts: list[Messages]) -> list[list[int]]:
        out = []
        for messages in prompts:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            out.append(list(ids))
        return out

    def _decode(self, completion_ids: list[list[int]]) -> list[str]:
        tok = self.tokenizer
        stop = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        texts = []
        for ids in completion_ids:
            cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
            texts.append(tok.decode(ids[:cut], skip_special_tokens=True))
        return texts

    def __call__(self, prompts: list[Messages]) -> list[str]:
        if self.trainer is None:
            raise RuntimeError("PolicyGenerator.trainer is not set: give it the trainer once it is built")
        self.calls += 1
        n_real = len(prompts)
        batch = list(prompts)
        target = self.fixed_batch if self.fixed_batch is not None else max(1, n_real)
        if n_real > target:
            raise ValueError(f"{n_real} dual prompts exceed the fixed batch of {target}")
        batch += [_FILLER] * (target - n_real)
        ids = self._encode(batch)
        if getattr(self.trainer, "use_vllm", False):
            completion_ids = self._generate_vllm(ids)
        else:
            # a filler-only call exists for its collectives, not its text: one token is enough
            completion_ids = self._generate_hf(ids, self.max_new_tokens if n_real else 1)
        return self._decode(completion_ids)[:n_real]

    def _generate_vllm(self, ids: list[list[int]]) -> list[list[int]]:
        trainer = self.trainer
        if trainer.state.global_step != getattr(trainer, "_last_loaded_step", None):
            trainer.vllm_generation.sync_weights()
            trainer._last_loaded_step = trainer.state.global_step
        _, completion_ids, _, _ = trainer.vllm_generation.generate(
            prompts=ids, images=None, num_generations=1
        )
        return [list(c) for c in completion_ids]

    def _generate_hf(self, ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):  # left padding, as decoder-only generation needs
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention[row, width - len(seq) :] = 1
        device = trainer.accelerator.device
        args = trainer.args
        with (
            unwrap_model_for_generation(
                trainer.model_wrapped,
                trainer.accelerator,
                gather_deepspeed3_params=args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as model,
            torch.no_grad(),
        ):
            was_training = model.training
            model.eval()
            try:
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=self.do_sample,
                    temperature=self.temperature if self.do_sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=pad_id,
                    use_cache=True,
                )
            finally:
                if was_training:
                    model.train()
        return out[:, width:].tolist()
