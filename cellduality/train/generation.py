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

The reader: by default the policy being trained answers the dual (the paper's design). For the tasks
in ``dual_frozen_tasks`` a generator with ``reader="reference"`` answers: the checkpoint GRPO started
from, frozen: TRL's reference model when ``beta > 0`` made one, the policy with its adapter disabled
under PEFT, otherwise a frozen copy taken before training (``reference_reader``). Why: a policy that
also answers its own dual can raise the dual reward by teaching its reader to agree with it rather
than by answering better (measured in
docs/results.md: the dual check's right-vs-wrong gap shrinks during dual GRPO). The reference reader
always generates with Hugging Face ``generate`` on every rank (also when the rollouts use vLLM, whose
engine holds the policy's weights), with the same fillers, so the rank symmetry above holds.
"""

from __future__ import annotations

from typing import Any

import torch

from cellduality.modeling.decode import lean_generation

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


def reference_reader(trainer: Any, initial: Any | None) -> Any:
    """The frozen model that answers the dual of ``dual_frozen_tasks`` (None: the PEFT policy with
    its adapter disabled). ``initial`` is a copy of the model taken before the trainer was built; it is
    used only when TRL made no reference model (``beta == 0``, no PEFT)."""
    from accelerate.utils import is_peft_model
    from trl.distributed import DistributedBackend

    from cellduality.data.schema import DataError

    if is_peft_model(trainer.model):
        return None
    if DistributedBackend(trainer.accelerator).is_zero3:
        # a ZeRO-3 reference holds a shard of each weight; generating token by token through its gather
        # hooks is the trap the ds3 guard refuses for the policy. Not measured on GPUs: refused.
        raise DataError(
            "dual_frozen_tasks is not supported under ZeRO-3 with full fine-tuning; use ZeRO-2, PEFT "
            "(use_peft: true: the reader is the policy without its adapter) or no frozen task"
        )
    if getattr(trainer, "ref_model", None) is not None:
        return trainer.ref_model
    if initial is None:
        raise RuntimeError("dual_frozen_tasks needs a copy of the model taken before training")
    initial.requires_grad_(False)
    initial.eval()
    if trainer.is_deepspeed_enabled:
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(initial, trainer.accelerator)
    return trainer.accelerator.prepare_model(initial, evaluation_mode=True)


class PolicyGenerator:
    """Callable ``prompts -> completions`` bound to a TRL trainer (set ``trainer`` after building it)."""

    def __init__(
        self,
        tokenizer: Any,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        fixed_batch: int | None = None,
        reader: str = "policy",
    ) -> None:
        self.tokenizer = tokenizer
        self.reader = reader
        #: the frozen model that answers when ``reader == "reference"`` (None under PEFT: the policy with
        #: its adapter disabled); set by the training module once the trainer exists
        self.reference: Any = None
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
        if self.reader == "reference":
            completion_ids = self._generate_hf(ids, self.max_new_tokens if n_real else 1, reference=True)
        elif getattr(self.trainer, "use_vllm", False):
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

    def _reader_context(self, reference: bool):
        """The model to generate with: the policy (unwrapped for generation), or the frozen reference."""
        from contextlib import contextmanager, nullcontext

        from trl.models.utils import unwrap_model_for_generation

        trainer = self.trainer
        args = trainer.args
        if reference and self.reference is not None:

            @contextmanager
            def frozen():
                yield trainer.accelerator.unwrap_model(self.reference)

            return frozen()
        policy = unwrap_model_for_generation(
            trainer.model_wrapped,
            trainer.accelerator,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
        if not reference:
            return policy

        @contextmanager
        def adapter_off():  # PEFT: the model GRPO started from is the policy without its adapter
            with (
                policy as model,
                model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext(),
            ):
                yield model

        return adapter_off()

    def _generate_hf(
        self, ids: list[list[int]], max_new_tokens: int, reference: bool = False
    ) -> list[list[int]]:

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
        self.generations += 1
        with self._reader_context(reference) as model, lean_generation(model) as cache:
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
                    **cache,
                )
            finally:
                if was_training:
                    model.train()
        return out[:, width:].tolist()
