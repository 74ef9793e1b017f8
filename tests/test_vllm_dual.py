"""The dual generation on vLLM uses the dual's own sampling settings, not the forward rollout's.

vLLM needs a GPU, so these CPU tests drive ``PolicyGenerator``'s vLLM path against stand-in engine and
client objects that record what they are given (the real tokenizer encodes and decodes). The real
engine runs in ``benchmarks/gpu_check.py --vllm`` on a GPU machine.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest

from cellduality.train.generation import PolicyGenerator


class SamplingParams:  # what vLLM's class is constructed with is all the test needs
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.max_tokens = kwargs["max_tokens"]


@dataclass
class _Out:
    token_ids: list[int]


@dataclass
class _Request:
    outputs: list[_Out]


@dataclass
class Engine:
    answer: list[int]
    calls: list[tuple[list[Any], list[SamplingParams]]] = field(default_factory=list)

    def generate(self, prompts, sampling_params, use_tqdm=False):
        self.calls.append((prompts, sampling_params))
        return [_Request([_Out(self.answer[: p.max_tokens])]) for p in sampling_params]


@dataclass
class Client:
    answer: list[int]
    calls: list[dict[str, Any]] = field(default_factory=list)

    def generate(self, prompts, **kwargs):
        self.calls.append({"prompts": prompts, **kwargs})
        return {"completion_ids": [self.answer[: kwargs["max_tokens"]] for _ in prompts]}


class _VG:
    def __init__(self, mode: str, answer: list[int]) -> None:
        self.mode = mode
        self.llm = Engine(answer)
        self.vllm_client = Client(answer)
        self.tensor_parallel_size = 1
        self.enable_sleep_mode = False
        self.synced = 0
        # the trainer's rollout settings, which the dual must NOT use
        self.temperature = 0.7
        self.max_completion_length = 1024

    def sync_weights(self) -> None:
        self.synced += 1

    def generate(self, *args, **kwargs):  # TRL's rollout generation: never the dual's path
        raise AssertionError("the dual generation must not go through the rollout's generate")


@pytest.fixture()
def tokenizer():
    from cellduality.modeling import build_tokenizer

    return build_tokenizer(["CD74", "FTL"], ["Name the hidden genes: CD74 FTL"])


@pytest.fixture(autouse=True)
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.SamplingParams = SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)


def _generator(tokenizer, mode: str, **kwargs):
    from accelerate import PartialState

    answer = tokenizer("<answer> CD74 FTL </answer>", add_special_tokens=False)["input_ids"]
    answer.append(tokenizer.eos_token_id)
    gen = PolicyGenerator(tokenizer, **kwargs)
    state = PartialState()
    gen.trainer = types.SimpleNamespace(
        use_vllm=True,
        state=types.SimpleNamespace(global_step=3),
        vllm_generation=_VG(mode, answer),
        accelerator=types.SimpleNamespace(process_index=state.process_index, is_main_process=True),
    )
    return gen


PROMPT = [{"role": "user", "content": "Name the hidden genes: CD74"}]


@pytest.mark.parametrize("sample", [False, True])
def test_colocate_uses_dual_settings(tokenizer, sample) -> None:
    gen = _generator(tokenizer, "colocate", max_new_tokens=40, do_sample=sample, temperature=1.3)
    texts = gen([PROMPT, PROMPT])
    vg = gen.trainer.vllm_generation
    ((prompts, params),) = vg.llm.calls
    assert len(prompts) == 2 and all("prompt_token_ids" in p for p in prompts)
    for p in params:
        assert p.kwargs["max_tokens"] == 40 and p.kwargs["n"] == 1
        assert p.kwargs["temperature"] == (1.3 if sample else 0.0)  # not the rollout's 0.7
    assert texts == ["<answer> CD74 FTL </answer>"] * 2
    assert vg.synced == 1
    gen([PROMPT])
    assert vg.synced == 1  # weights pushed once per optimizer step, not per call


def test_colocate_filler_gets_one_token(tokenizer) -> None:
    gen = _generator(tokenizer, "colocate", max_new_tokens=40)
    assert gen([]) == []
    ((prompts, params),) = gen.trainer.vllm_generation.llm.calls
    assert len(prompts) == 1 and params[0].kwargs["max_tokens"] == 1


def test_server_sends_explicit_parameters(tokenizer) -> None:
    gen = _generator(tokenizer, "server", max_new_tokens=24, do_sample=True, temperature=0.9)
    texts = gen([PROMPT, PROMPT, PROMPT])
    (call,) = gen.trainer.vllm_generation.vllm_client.calls
    assert len(call["prompts"]) == 3 and call["n"] == 1
    assert call["max_tokens"] == 24 and call["temperature"] == 0.9
    assert len(texts) == 3
    assert gen([]) == [] and len(gen.trainer.vllm_generation.vllm_client.calls) == 1  # nothing to send
