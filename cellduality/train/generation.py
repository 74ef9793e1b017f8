"""The policy's own generation for the dual reward, inside the trainer, safe under several ranks.

``PolicyGenerator`` is the ``generate`` function ``DualReward`` calls once per reward call. It answers
every dual prompt of the batch in one batched generation with the trainer's current weights:

- Hugging Face path: ``model.generate`` inside TRL's ``unwrap_model_for_generation`` (gathers ZeRO-3
  shards, turns gradient checkpointing off so the KV cache works), under ``torch.no_grad`` and in eval
  mode (no dropout), then back to train mode. Dual tokens never reach the loss.
- vLLM path (``use_vllm``): the trainer's vLLM engine, with the *dual's own* sampling parameters
  (``dual_do_sample`` / ``dual_temperature`` / ``dual_max_new_tokens``), never the forward rollout's.
  TRL's ``vllm_generation.generate`` always uses the trainer's temperature and completion length, so
  it is not called: colocate mode calls the engine (``vllm_generation.llm.generate``) with one
  ``SamplingParams`` per prompt (a filler gets ``max_tokens=1``); server mode gathers every rank's
  prompts, the main process calls the client (``vllm_generation.vllm_client.generate``) with explicit
  parameters, and the result is broadcast and sliced by each rank's real count (no padding needed).

Rank symmetry: a rank with no dual prompt still generates (one filler prompt) so that collective
operations inside generation (ZeRO-3 gathers, vLLM's tensor-parallel gather) happen the same number
of times on every rank; in server mode each rank calls the gather and the broadcast exactly once.
``generations`` counts the generation calls this rank made (fillers included), so a multi-rank test
can compare them across ranks.

vLLM colocate mode follows what TRL 1.16's own ``VLLMGeneration.generate`` does around a generation
(``trl/generation/vllm_generation.py``):

- sleep mode: TRL's rollout ends with ``llm.sleep(level=2)``, which *discards the weights*, and sets
  ``_llm_weights_sleeping``. The dual reward runs right after that rollout, at the same step, so the
  step test alone would skip the weight push and generate from freed memory. Here the weights are
  re-pushed (``sync_weights`` wakes the ``weights`` tag and loads the current policy) whenever they
  sleep, the ``kv_cache`` tag is woken, and the engine goes back to sleep at level 2 afterwards, so
  TRL's next rollout again knows it must re-push.
- PEFT with tensor parallelism > 1: a barrier on the default group before ``llm.generate``, as TRL
  does (vLLM's TP collective can otherwise race NCCL's cleanup of the LoRA all-reduce and hang;
  huggingface/trl#3671).

The TRL private attributes read here are listed in ``TRL_PRIVATE_ATTRIBUTES``; a test checks that the
installed TRL still has them.
"""

from __future__ import annotations

from typing import Any

import torch

Messages = list[dict[str, str]]
_FILLER: Messages = [{"role": "user", "content": "."}]

#: TRL internals the vLLM path relies on, as ``(object, attribute)``: ``trainer`` is ``GRPOTrainer``,
#: ``vllm_generation`` its ``VLLMGeneration``. A TRL release that renames one breaks dual generation
#: silently (a skipped weight push), so ``tests/test_trl_contract.py`` checks each against the installed
#: TRL's source and the ``trl`` pin names only checked versions.
TRL_PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("trainer", "vllm_generation"),
    ("trainer", "_last_loaded_step"),
    ("vllm_generation", "llm"),
    ("vllm_generation", "vllm_client"),
    ("vllm_generation", "mode"),
    ("vllm_generation", "enable_sleep_mode"),
    ("vllm_generation", "tensor_parallel_size"),
    ("vllm_generation", "tp_group"),
    ("vllm_generation", "_llm_weights_sleeping"),
    ("vllm_generation", "sync_weights"),
)


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
        self.generations = 0  # generation calls made on this rank, fillers included

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
            completion_ids = self._generate_vllm(ids, n_real)
        else:
            # a filler-only call exists for its collectives, not its text: one token is enough
            completion_ids = self._generate_hf(ids, self.max_new_tokens if n_real else 1)
        return self._decode(completion_ids)[:n_real]

    def sampling(self, max_new_tokens: int | None = None) -> dict[str, Any]:
        """The dual's sampling parameters in vLLM's terms (greedy unless ``do_sample``)."""
        return {
            "n": 1,
            "temperature": self.temperature if self.do_sample else 0.0,
            "top_p": 1.0,
            "top_k": 0,  # no truncation (vLLM and TRL's client: 0 disables top-k)
            "max_tokens": self.max_new_tokens if max_new_tokens is None else max_new_tokens,
        }

    def _generate_vllm(self, ids: list[list[int]], n_real: int) -> list[list[int]]:
        trainer = self.trainer
        vg = trainer.vllm_generation
        # Sleep level 2 dropped the weights after the rollout of this very step: waking them is not
        # enough, they must be pushed again (TRL's generate does the same when the flag is set)
        weights_asleep = (
            vg.mode == "colocate"
            and bool(getattr(vg, "enable_sleep_mode", False))
            and bool(getattr(vg, "_llm_weights_sleeping", False))
        )
        if weights_asleep or trainer.state.global_step != getattr(trainer, "_last_loaded_step", None):
            vg.sync_weights()  # a collective (ZeRO-3 gathers): every rank sees the same flag and step
            trainer._last_loaded_step = trainer.state.global_step
        self.generations += 1
        if vg.mode == "server":
            return self._generate_vllm_server(vg, ids[:n_real])
        return self._generate_vllm_colocate(vg, ids, n_real)

    def _generate_vllm_colocate(self, vg: Any, ids: list[list[int]], n_real: int) -> list[list[int]]:
        from accelerate.utils import is_peft_model
        from vllm import SamplingParams

        params = [SamplingParams(**self.sampling(None if k < n_real else 1)) for k in range(len(ids))]
        prompts, orig = ids, len(ids)
        tp = int(getattr(vg, "tensor_parallel_size", 1) or 1)
        if tp > 1:  # every rank of a tensor-parallel group generates the group's prompts together
            gathered: list[Any] = [None] * tp
            torch.distributed.all_gather_object(
                gathered, (ids, [p.max_tokens for p in params]), group=vg.tp_group
            )
            prompts = [x for sub, _ in gathered for x in sub]
            params = [SamplingParams(**self.sampling(m)) for _, caps in gathered for m in caps]
        sleep_mode = bool(getattr(vg, "enable_sleep_mode", False))
        if sleep_mode:
            vg.llm.wake_up(tags=["kv_cache"])
        if tp > 1 and is_peft_model(self.trainer.model):
            # drain NCCL after the LoRA all-reduce before vLLM's TP collective (TRL does the same)
            local = self.trainer.accelerator.local_process_index
            torch.distributed.barrier(device_ids=[local] if torch.cuda.is_available() else None)
        outputs = vg.llm.generate(
            [{"prompt_token_ids": x} for x in prompts], sampling_params=params, use_tqdm=False
        )
        if sleep_mode:
            vg.llm.sleep(level=2)
            vg._llm_weights_sleeping = True  # the next generation (rollout or dual) re-pushes them
        completions = [list(o.outputs[0].token_ids) for o in outputs]
        if tp > 1:
            rank = torch.distributed.get_rank(group=vg.tp_group)
            offsets = [0]
            for sub, _ in gathered:
                offsets.append(offsets[-1] + len(sub))
            completions = completions[offsets[rank] : offsets[rank + 1]]
        if len(completions) != orig:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for {orig} dual prompts")
        return completions

    def _generate_vllm_server(self, vg: Any, ids: list[list[int]]) -> list[list[int]]:
        from accelerate.utils import broadcast_object_list, gather_object

        accelerator = self.trainer.accelerator
        counts = gather_object([len(ids)])
        everything = gather_object(ids)
        payload: list[Any] = [None]
        if accelerator.is_main_process:
            params = self.sampling()
            params.pop("n")
            if everything:
                out = vg.vllm_client.generate(prompts=everything, n=1, **params)
                payload = [out["completion_ids"]]
            else:
                payload = [[]]
        broadcast_object_list(payload, from_process=0)
        start = sum(counts[: accelerator.process_index])
        return [list(c) for c in payload[0][start : start + len(ids)]]

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
        self.generations += 1
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
