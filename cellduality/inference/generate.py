"""Batched generation for the evaluation: vLLM on a CUDA machine that has it, Hugging Face otherwise.

Both backends take chat messages and return the completion text only (prompt and special tokens cut).
The Hugging Face path pads on the left (a decoder-only model continues from the last position, so the
prompts must be right-aligned), decodes greedily unless a temperature is set, and merges a LoRA adapter
into the weights (one matrix product per layer instead of two). :func:`generate_cached` puts a cache in
front of a backend: only the missing completions are generated, batch by batch, each batch on disk
before the next, under a progress bar; the model itself is loaded only when something is missing.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cellduality.inference.cache import CompletionCache

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are decoded. ``temperature == 0`` means greedy (the default: reproducible).

    ``batch_size`` only changes speed, so it is not part of :meth:`identity` (the cache key).
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def identity(self) -> dict[str, Any]:
        """The settings that change what is generated."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "greedy": True}
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: a Hugging Face folder / checkpoint / hub id, an optional LoRA adapter, a name.

    A folder that holds only a PEFT adapter (``adapter_config.json`` and no ``config.json``) is
    understood as ``base model + that adapter``, the base read from the adapter's config.
    """

    path: str
    adapter: str | None = None
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        base = Path(self.adapter or self.path).name or str(self.adapter or self.path)
        return base

    def resolved(self) -> ModelSpec:
        p = Path(self.path)
        if (
            self.adapter is None
            and (p / "adapter_config.json").is_file()
            and not (p / "config.json").is_file()
        ):
            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise ValueError(f"{p} holds a LoRA adapter without base_model_name_or_path: pass the base")
            return ModelSpec(str(base), str(p), self.name or p.name)
        return self

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``PATH`` or ``PATH,adapter=DIR,name=LABEL`` (the ``--model`` flag's syntax)."""
        head, *options = text.split(",")
        fields: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key.strip() not in ("adapter", "name"):
                raise ValueError(f"--model {text!r}: options are adapter=DIR and name=LABEL, got {option!r}")
            fields[key.strip()] = value.strip()
        return cls(head.strip(), fields.get("adapter"), fields.get("name"))


class Backend(Protocol):
    """Anything that turns a list of chat prompts into completion texts."""

    name: str
    chunk_size: int

    def generate(self, prompts: Sequence[Messages], settings: GenerationSettings) -> list[str]: ...


def vllm_usable() -> bool:
    """vLLM is used only when it is installed AND a CUDA device is present (it is GPU-only)."""
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


class HFBackend:
    """``model.generate`` in batches, left-padded, with an optional merged LoRA adapter."""

    name = "hf"

    def __init__(self, spec: ModelSpec, settings: GenerationSettings, device: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float32
        if self.device.startswith("cuda") and torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16
        self.tokenizer = AutoTokenizer.from_pretrained(spec.path)
        self.tokenizer.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=dtype)
        if spec.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, spec.adapter).merge_and_unload()
        self.model = model.to(self.device).eval()
        self.chunk_size = max(1, settings.batch_size)

    def _encode(self, messages: Messages) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def generate(self, prompts: Sequence[Messages], settings: GenerationSettings) -> list[str]:
        import torch

        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        encoded = [self._encode(m) for m in prompts]
        width = max(len(x) for x in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention[row, width - len(seq) :] = 1
        kwargs: dict[str, Any] = {"do_sample": settings.do_sample}
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=None)
            torch.manual_seed(settings.seed)
        else:  # silence the model's own sampling defaults, which greedy decoding ignores anyway
            kwargs.update(temperature=None, top_p=None, top_k=None)
        from cellduality.modeling.decode import lean_generation
        from cellduality.modeling.draws import torch_draws

        # on the CPU: fewer Python calls per token, and torch.multinomial's own draws made faster
        with lean_generation(self.model) as cache, torch_draws(None if settings.do_sample else False):
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=settings.max_new_tokens,
                pad_token_id=pad_id,
                **kwargs,
                **cache,
            )
        stop = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
        texts = []
        for ids in out[:, width:].tolist():
            cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
            texts.append(tok.decode(ids[:cut], skip_special_tokens=True))
        return texts


class VLLMBackend:
    """vLLM's offline ``LLM.chat``: continuous batching on the GPU, LoRA through a ``LoRARequest``."""

    name = "vllm"

    def __init__(self, spec: ModelSpec, settings: GenerationSettings) -> None:
        from vllm import LLM

        self._llm = LLM(model=spec.path, enable_lora=spec.adapter is not None, seed=settings.seed)
        self._lora = None
        if spec.adapter:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("adapter", 1, spec.adapter)
        # vLLM schedules its own batches; chunks only bound what a crash can lose
        self.chunk_size = max(256, settings.batch_size)

    def generate(self, prompts: Sequence[Messages], settings: GenerationSettings) -> list[str]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=settings.temperature if settings.do_sample else 0.0,
            top_p=settings.top_p if settings.do_sample else 1.0,
            max_tokens=settings.max_new_tokens,
        )  # no per-request seed: repeated prompts (self-verification samples) must differ; LLM(seed=) fixes the run
        outputs = self._llm.chat(list(prompts), params, lora_request=self._lora, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]


BackendFactory = Callable[[ModelSpec, GenerationSettings], Backend]


def load_backend(spec: ModelSpec, settings: GenerationSettings, backend: str = "auto") -> Backend:
    """``auto``: vLLM when it is installed and CUDA is available, else Hugging Face."""
    if backend not in ("auto", "hf", "vllm"):
        raise ValueError(f"backend must be auto, hf or vllm, got {backend!r}")
    from cellduality.modeling.checkpoint import ModelFolderError, check_model_folder

    check_model_folder(spec.path, spec.adapter)
    if backend == "vllm" or (backend == "auto" and vllm_usable()):
        if not vllm_usable():
            raise ModelFolderError("--backend vllm needs the vllm package and a CUDA device")
        make: Callable[[], Backend] = lambda: VLLMBackend(spec, settings)  # noqa: E731
    else:
        make = lambda: HFBackend(spec, settings)  # noqa: E731
    try:
        return make()
    except (
        OSError,
        ValueError,
        RuntimeError,
        ImportError,
    ) as exc:  # hub, tokenizer, weights: say which model
        if isinstance(exc, ModelFolderError):
            raise
        lines = str(exc).strip().splitlines()
        first = lines[0] if lines else type(exc).__name__
        raise ModelFolderError(
            f"the model {spec.path}{f' + adapter {spec.adapter}' if spec.adapter else ''} could not be loaded: "
            f"{type(exc).__name__}: {first}"
        ) from exc


def backend_name(backend: str = "auto") -> str:
    """The backend ``load_backend`` would pick, without loading a model (part of the cache identity)."""
    if backend == "auto":
        return "vllm" if vllm_usable() else "hf"
    return backend


def generate_cached(
    prompts: Sequence[Messages],
    keys: Sequence[str],
    cache: CompletionCache,
    settings: GenerationSettings,
    get_backend: Callable[[], Backend],
    desc: str = "generating",
    progress: bool = True,
) -> list[str]:
    """Completions for ``prompts`` (one per key), generating only the keys ``cache`` lacks.

    ``get_backend`` is called only when something is missing, so a fully cached run never loads a model.
    Each chunk is written to the cache before the next is generated.
    """
    if len(prompts) != len(keys):
        raise ValueError(f"{len(prompts)} prompts but {len(keys)} keys")
    todo = cache.missing(keys)
    if todo:
        from tqdm.auto import tqdm

        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        backend = get_backend()
        chunk = max(1, int(getattr(backend, "chunk_size", settings.batch_size)))
        with tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress, leave=False) as bar:
            for start in range(0, len(todo), chunk):
                batch = todo[start : start + chunk]
                texts = backend.generate([prompts[first[k]] for k in batch], settings)
                if len(texts) != len(batch):
                    raise RuntimeError(
                        f"the backend returned {len(texts)} completions for {len(batch)} prompts"
                    )
                cache.put_many(zip(batch, texts, strict=True))
                bar.update(len(batch))
    return [cache.get(k) or "" for k in keys]


__all__ = [
    "Backend",
    "BackendFactory",
    "GenerationSettings",
    "HFBackend",
    "ModelSpec",
    "VLLMBackend",
    "backend_name",
    "generate_cached",
    "load_backend",
    "vllm_usable",
]
