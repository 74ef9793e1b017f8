"""The dual generation on vLLM: the dual's own sampling settings, the current weights, every rank.

vLLM needs a GPU, so these CPU tests drive ``PolicyGenerator``'s vLLM path against a stand-in engine
and server client that keep weights the way vLLM does (sleep level 2 frees them; ``wake_up`` maps
fresh memory that holds nothing until weights are loaded) and record every call in order. The weight
push is TRL 1.16's own ``VLLMGeneration.sync_weights`` and the rollout is TRL's own
``VLLMGeneration.generate``, run on the stand-in, so the tests check our generation against what TRL
really does around it. Several ranks are real processes over gloo (tensor parallelism, server mode).
The real engine runs in ``benchmarks/gpu_check.py`` on a GPU machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from cellduality.train.generation import PolicyGenerator


class SamplingParams:  # what vLLM's class is constructed with is all the test needs
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.max_tokens = kwargs["max_tokens"]


@dataclass
class _Out:
    token_ids: list[int]
    logprobs: Any = None


@dataclass
class _Request:
    prompt_token_ids: list[int]
    outputs: list[_Out]


def _fingerprint(weights: dict[str, torch.Tensor] | None) -> dict[str, list[float]] | None:
    if weights is None:
        return None
    return {name: t.flatten().tolist() for name, t in sorted(weights.items())}


class Engine:
    """Stand-in for ``vllm.LLM`` in colocate mode: weights, KV cache, sleep levels, a call log.

    ``generate`` answers each prompt with the prompt's own ordinary tokens (so a wrong slice is seen)
    and records which weights it generated with: ``None`` means freed memory (garbage on a GPU).
    """

    def __init__(self, log: list[tuple], special: set[int], eos: int) -> None:
        self.log = log
        self.special = special
        self.eos = eos
        self.weights: dict[str, torch.Tensor] | None = None
        self.kv_cache = False
        self.loaded = False
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load_weights))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        )
        self.calls: list[tuple[list[Any], list[SamplingParams]]] = []

    def _load_weights(self, pairs: list[tuple[str, torch.Tensor]]) -> None:
        if self.weights is None:
            raise AssertionError("load_weights into freed memory: the weights tag was not woken")
        for name, tensor in pairs:
            self.weights[name] = tensor.detach().clone()
        self.log.append(("load",))

    def wake_up(self, tags: list[str]) -> None:
        self.log.append(("wake", tuple(tags)))
        if "weights" in tags and self.weights is None:
            self.weights = {}  # mapped again, but what was there is gone until loaded
        if "kv_cache" in tags:
            self.kv_cache = True

    def sleep(self, level: int) -> None:
        self.log.append(("sleep", level))
        self.kv_cache = False
        if level == 2:
            self.weights = None

    def reset_prefix_cache(self) -> None:
        self.log.append(("reset_prefix_cache",))

    def answer(self, ids: list[int], max_tokens: int) -> list[int]:
        return ([t for t in ids if t not in self.special] + [self.eos])[:max_tokens]

    def generate(self, prompts, sampling_params, use_tqdm=False):
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        self.calls.append((prompts, params))
        usable = self.weights if self.kv_cache else None
        self.log.append(("generate", len(prompts), _fingerprint(usable)))
        return [
            _Request(p["prompt_token_ids"], [_Out(self.answer(p["prompt_token_ids"], sp.max_tokens))])
            for p, sp in zip(prompts, params, strict=True)
        ]


class Client:
    """Stand-in for TRL's ``VLLMClient``: receives weight pushes and generation requests."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.weights: dict[str, torch.Tensor] = {}
        self.calls: list[dict[str, Any]] = []

    def update_named_params(self, metadata, params) -> None:
        for name, tensor in params:
            self.weights[name] = tensor.detach().clone()
        self.engine.log.append(("load",))

    def reset_prefix_cache(self) -> None:
        self.engine.log.append(("reset_prefix_cache",))

    def generate(self, prompts, **kwargs):
        self.calls.append({"prompts": prompts, **kwargs})
        self.engine.log.append(("generate", len(prompts), _fingerprint(self.weights)))
        return {"completion_ids": [self.engine.answer(p, kwargs["max_tokens"]) for p in prompts]}


def _vllm_generation(mode: str, engine: Engine, model: torch.nn.Module, accelerator: Any, **kw: Any):
    """TRL's own ``VLLMGeneration`` around the stand-in engine (its ``__init__`` would start vLLM)."""
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    vg = object.__new__(VLLMGeneration)
    vg.model, vg.accelerator, vg._dist = model, accelerator, DistributedBackend(accelerator)
    vg.mode, vg.structured_outputs_regex, vg._weight_metadata = mode, None, None
    vg.tensor_parallel_size = kw.get("tensor_parallel_size", 1)
    vg.enable_sleep_mode = kw.get("enable_sleep_mode", False)
    vg.tp_group = kw.get("tp_group")
    # the trainer's rollout settings, which the dual must NOT use
    vg.temperature, vg.top_p, vg.top_k, vg.min_p, vg.repetition_penalty = 0.7, 1.0, 0, 0.0, 1.0
    vg.max_completion_length, vg.logprobs, vg.generation_kwargs = 1024, 0, {}
    if mode == "colocate":
        vg.llm = engine
        engine.weights, engine.kv_cache = {}, True  # LLM(...) loads the model; sleep mode frees it
        if vg.enable_sleep_mode:
            engine.sleep(level=2)
        vg._llm_weights_sleeping = vg.enable_sleep_mode
    elif accelerator.is_main_process:
        vg.vllm_client = Client(engine)
    engine.log.clear()
    return vg


@pytest.fixture(scope="module")
def tokenizer():
    from cellduality.modeling import build_tokenizer

    return build_tokenizer(["CD74", "FTL"], ["Name the hidden genes: CD74 FTL"])


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    import trl.generation.vllm_generation  # noqa: F401  (before the stand-in: TRL probes vLLM's spec)

    module = types.ModuleType("vllm")
    module.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    # TRL imports SamplingParams at import time only when vLLM is installed
    monkeypatch.setattr("trl.generation.vllm_generation.SamplingParams", SamplingParams, raising=False)


def _accelerator() -> Any:
    from accelerate import PartialState

    state = PartialState()
    return types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None),
        process_index=state.process_index,
        local_process_index=state.local_process_index,
        is_main_process=state.is_main_process,
        device=torch.device("cpu"),
    )


def _generator(tokenizer, mode: str, model: torch.nn.Module | None = None, **kwargs: Any) -> PolicyGenerator:
    vllm_kw = {
        k: kwargs.pop(k) for k in ("enable_sleep_mode", "tensor_parallel_size", "tp_group") if k in kwargs
    }
    model = model if model is not None else torch.nn.Linear(2, 2)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    engine = Engine([], special, tokenizer.eos_token_id)
    accelerator = _accelerator()
    gen = PolicyGenerator(tokenizer, **kwargs)
    gen.trainer = types.SimpleNamespace(
        use_vllm=True,
        model=model,
        state=types.SimpleNamespace(global_step=0),
        _last_loaded_step=-1,  # what GRPOTrainer sets when it builds its vLLM backend
        vllm_generation=_vllm_generation(mode, engine, model, accelerator, **vllm_kw),
        accelerator=accelerator,
    )
    gen.engine = engine  # for the tests
    return gen


def _rollout(trainer: Any, prompt_ids: list[list[int]]) -> None:
    """What ``GRPOTrainer._generate_single_turn`` does with vLLM in TRL 1.16 (grpo_trainer.py)."""
    if trainer.state.global_step != trainer._last_loaded_step:
        trainer.vllm_generation.sync_weights()
        trainer._last_loaded_step = trainer.state.global_step
    trainer.vllm_generation.generate(prompts=prompt_ids, images=None, num_generations=1)


def _optimizer_step(trainer: Any) -> None:
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.5)
    trainer.state.global_step += 1


def _current(model: torch.nn.Module) -> dict[str, list[float]]:
    return _fingerprint(dict(model.named_parameters()))


PROMPT = [{"role": "user", "content": "Name the hidden genes: CD74"}]
OTHER = [{"role": "user", "content": "Name the hidden genes: FTL"}]


@pytest.mark.parametrize("sample", [False, True])
def test_colocate_uses_dual_settings(tokenizer, sample) -> None:
    gen = _generator(tokenizer, "colocate", max_new_tokens=40, do_sample=sample, temperature=1.3)
    texts = gen([PROMPT, OTHER])
    ((prompts, params),) = gen.engine.calls
    assert len(prompts) == 2 and all("prompt_token_ids" in p for p in prompts)
    for p in params:
        assert p.kwargs["max_tokens"] == 40 and p.kwargs["n"] == 1
        assert p.kwargs["temperature"] == (1.3 if sample else 0.0)  # not the rollout's 0.7
    assert texts[0].strip().endswith("CD74") and texts[1].strip().endswith("FTL")
    loads = [e for e in gen.engine.log if e[0] == "load"]
    gen([PROMPT])
    assert [e for e in gen.engine.log if e[0] == "load"] == loads  # pushed once per step, not per call


def test_colocate_filler_gets_one_token(tokenizer) -> None:
    gen = _generator(tokenizer, "colocate", max_new_tokens=40)
    assert gen([]) == []
    ((prompts, params),) = gen.engine.calls
    assert len(prompts) == 1 and params[0].kwargs["max_tokens"] == 1
    assert gen.generations == 1  # the filler counts: it exists for the collectives


@pytest.mark.parametrize("sleep", [False, True])
def test_dual_after_rollout_generates_with_current_weights(tokenizer, sleep) -> None:
    """The dual reward runs right after TRL's rollout of the same step. Under sleep mode that rollout
    ended with sleep(level=2), which frees the weights: the dual answers must still come from the
    policy's current weights, with the KV cache awake, and the engine must go back to sleep."""
    gen = _generator(tokenizer, "colocate", max_new_tokens=8, enable_sleep_mode=sleep)
    trainer, engine = gen.trainer, gen.engine
    prompt_ids = gen._encode([PROMPT])
    for _ in range(3):  # three optimizer steps: the weights change between them
        _rollout(trainer, prompt_ids)
        rollout_seen = [e for e in engine.log if e[0] == "generate"][-1][2]
        assert rollout_seen == _current(trainer.model)  # TRL's own path, as a control
        engine.log.clear()
        texts = gen([PROMPT, OTHER])
        generates = [e for e in engine.log if e[0] == "generate"]
        assert generates and all(e[2] == _current(trainer.model) for e in generates), engine.log
        assert texts[0].strip().endswith("CD74") and texts[1].strip().endswith("FTL")
        if sleep:
            kinds = [e[0] if e[0] != "wake" else f"wake:{','.join(e[1])}" for e in engine.log]
            assert kinds.index("wake:weights") < kinds.index("load") < kinds.index("wake:kv_cache")
            assert kinds.index("wake:kv_cache") < kinds.index("generate") < kinds.index("sleep")
            assert engine.log[-1] == ("sleep", 2) and engine.weights is None
            assert trainer.vllm_generation._llm_weights_sleeping  # TRL's next rollout re-pushes
        else:
            assert ("load",) not in engine.log  # the rollout already pushed this step's weights
        _optimizer_step(trainer)


def test_server_sends_explicit_parameters(tokenizer) -> None:
    gen = _generator(tokenizer, "server", max_new_tokens=24, do_sample=True, temperature=0.9)
    texts = gen([PROMPT, PROMPT, OTHER])
    (call,) = gen.trainer.vllm_generation.vllm_client.calls
    assert len(call["prompts"]) == 3 and call["n"] == 1
    assert call["max_tokens"] == 24 and call["temperature"] == 0.9
    assert len(texts) == 3 and texts[2].strip().endswith("FTL")
    assert gen([]) == [] and len(gen.trainer.vllm_generation.vllm_client.calls) == 1  # nothing to send
    assert gen.generations == 2


# ---------------------------------------------------------------- several ranks, real processes (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[[int], Any], rank: int, world: int, port: int, queue: Any) -> None:
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
        )
        from accelerate import PartialState

        PartialState._reset_state()
        state = PartialState(cpu=True)
        assert state.num_processes == world, state
        queue.put((rank, "ok", fn(rank)))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))


def _on_ranks(fn: Callable[[int], Any], world: int = 2) -> list[Any]:
    """Run ``fn(rank)`` on ``world`` forked processes joined over gloo; the results by rank."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = [queue.get(timeout=180) for _ in procs]  # a hang guard, not a timing assertion
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [msg for _, status, msg in got if status == "error"]
    assert not errors, "\n".join(errors)
    return [result for _, _, result in sorted(got, key=lambda x: x[0])]


def _tp_rank(tokenizer: Any, peft: bool, sleep: bool) -> Callable[[int], dict[str, Any]]:
    def run(rank: int) -> dict[str, Any]:
        torch.manual_seed(0)  # the same policy on both ranks, as DDP / ZeRO keep it
        group = torch.distributed.new_group([0, 1])
        if peft:
            import accelerate.utils

            accelerate.utils.is_peft_model = lambda model: True
        barrier = torch.distributed.barrier

        def recorded_barrier(*args: Any, **kwargs: Any) -> Any:
            gen.engine.log.append(("barrier",))
            return barrier(*args, **kwargs)

        torch.distributed.barrier = recorded_barrier
        gen = _generator(
            tokenizer,
            "colocate",
            max_new_tokens=8,
            enable_sleep_mode=sleep,
            tensor_parallel_size=2,
            tp_group=group,
        )
        texts = []  # rank 0: 2 prompts then none; rank 1: none then 1
        for prompts in [[PROMPT, PROMPT], []] if rank == 0 else [[], [OTHER]]:
            texts.append(gen(prompts))
            _optimizer_step(gen.trainer)
        torch.distributed.barrier = barrier
        return {
            "texts": texts,
            "generations": gen.generations,
            "log": [
                e if e[0] != "generate" else ("generate", e[1], e[2] is not None) for e in gen.engine.log
            ],
            "prompts_seen": [len(p) for p, _ in gen.engine.calls],
        }

    return run


@pytest.mark.distributed
@pytest.mark.parametrize(("peft", "sleep"), [(False, False), (True, True)])
def test_tensor_parallel_group_generates_together(tokenizer, peft, sleep) -> None:
    """TP = 2: both ranks of the group generate the group's prompts in one call (a rank with none
    sends a filler), each keeps its own answers, both make the same number of generation calls;
    with PEFT a barrier precedes every generate, as in TRL."""
    results = _on_ranks(_tp_rank(tokenizer, peft, sleep))
    r0, r1 = results
    assert r0["generations"] == r1["generations"] == 2
    assert r0["prompts_seen"] == r1["prompts_seen"] == [3, 2]  # 2 + filler, then filler + 1
    assert [len(t) for t in r0["texts"]] == [2, 0] and [len(t) for t in r1["texts"]] == [0, 1]
    assert all(t.strip().endswith("CD74") for t in r0["texts"][0]) and r1["texts"][1][0].strip().endswith(
        "FTL"
    )
    for r in results:
        assert all(e[2] for e in r["log"] if e[0] == "generate")  # weights present at every generate
        kinds = [e[0] for e in r["log"]]
        if peft:
            gens = [i for i, k in enumerate(kinds) if k == "generate"]
            assert all(kinds[i - 1] == "barrier" for i in gens), kinds
        else:
            assert "barrier" not in kinds


def _server_rank(tokenizer: Any) -> Callable[[int], dict[str, Any]]:
    def run(rank: int) -> dict[str, Any]:
        torch.manual_seed(0)
        gen = _generator(tokenizer, "server", max_new_tokens=16)
        rounds = [[PROMPT, PROMPT, PROMPT], [], [OTHER]] if rank == 0 else [[OTHER], [], [PROMPT, PROMPT]]
        texts, current = [], []
        for prompts in rounds:
            gen.engine.log.clear()
            texts.append(gen(prompts))
            # did the server generate with the weights of this step? (only the main process sends)
            current += [e[2] == _current(gen.trainer.model) for e in gen.engine.log if e[0] == "generate"]
            _optimizer_step(gen.trainer)
        client = getattr(gen.trainer.vllm_generation, "vllm_client", None)
        return {
            "texts": texts,
            "generations": gen.generations,
            "requests": [len(c["prompts"]) for c in client.calls] if client else None,
            "current_at_generate": current,
        }

    return run


@pytest.mark.distributed
def test_server_mode_several_ranks(tokenizer) -> None:
    """Server mode, 2 ranks with uneven dual prompts (none on one rank in some calls): the main
    process sends every rank's prompts in one request, each rank gets back exactly its own answers,
    and both ranks make the same number of generation calls."""
    r0, r1 = _on_ranks(_server_rank(tokenizer))
    assert r0["generations"] == r1["generations"] == 3
    assert r0["requests"] == [4, 3] and r1["requests"] is None  # the round with no prompt sends nothing
    assert [len(t) for t in r0["texts"]] == [3, 0, 1] and [len(t) for t in r1["texts"]] == [1, 0, 2]
    assert all(t.strip().endswith("CD74") for t in r0["texts"][0]) and r1["texts"][0][0].strip().endswith(
        "FTL"
    )
    assert r0["texts"][2][0].strip().endswith("FTL") and all(
        t.strip().endswith("CD74") for t in r1["texts"][2]
    )
    assert r0["current_at_generate"] == [True, True]  # the weights of that step, pushed by the trainer
