"""GPU check: a few dual-GRPO steps in bf16 on one GPU with the Llama-3.2-3B architecture.

The model is initialised from a config (no download): Llama-3.2-3B-Instruct's shape (hidden 3072,
28 layers, 24 heads, 8 key/value heads, intermediate 8192, tied embeddings) with the gene-symbol
tokenizer of the tiny model, so its vocabulary is small. Untrained, its completions rarely parse, so a
short SFT on offline-teacher traces comes first (as in the demo) to make the dual path do real work.
Prints step time, tokens/s and peak GPU memory; paste them into docs/recipes.md.

    python benchmarks/gpu_check.py [--steps 5] [--layers 28] [--out /tmp/cellduality_gpu_check]
    python benchmarks/gpu_check.py --cpu-smoke      # tiny shapes on the CPU: checks the script runs
    python benchmarks/gpu_check.py --vllm           # also a vLLM colocate dual-GRPO run (vLLM installed)

With ``--vllm`` a second GRPO run uses vLLM in colocate mode for the rollouts and for the dual
generation, with the dual's own sampling settings (temperature 0.7, 32 tokens, not the rollout's 1.0 /
64): the printed ``vllm_colocate`` block holds its step time and the sampling parameters the dual calls
were made with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
LLAMA_32_3B = {
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 28,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}


def build_model(out: Path, layers: int, cpu_smoke: bool) -> Path:
    """The tiny model's tokenizer with a Llama-3.2-3B-shaped model (or a tiny one for --cpu-smoke)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cellduality.data import load_dataset
    from cellduality.modeling import ensure_tiny_model
    from cellduality.tasks import TaskConfig, build_tasks
    from cellduality.train.common import texts_of_tasks

    tiny = out / "tokenizer_source"
    prepared = build_tasks(load_dataset("pbmc68k"), config=TaskConfig(top_k=16))
    ensure_tiny_model(tiny, prepared.genes, texts_of_tasks(prepared))
    tok = AutoTokenizer.from_pretrained(tiny)
    shape = dict(LLAMA_32_3B, num_hidden_layers=layers)
    if cpu_smoke:
        shape.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if cpu_smoke else torch.bfloat16)
    target = out / "model"
    model.save_pretrained(target)
    tok.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    return target


def grpo_argv(args: argparse.Namespace, sft_dir: Path, dtype: str, out: str, *extra: str) -> list[str]:
    """The GRPO run of the check: the tiny dual recipe with the 3B-shaped model, ``extra`` on top."""
    return [
        "--config",
        str(REPO / "recipes/tiny-cpu/grpo_dual.yaml"),
        "--model_name_or_path",
        str(sft_dir),
        "--build_tiny_model",
        "false",
        "--dtype",
        dtype,
        "--output_dir",
        str(args.out / out),
        "--prepared_dir",
        str(args.out / "prepared"),
        "--max_steps",
        str(args.steps),
        "--num_generations",
        "8",
        "--per_device_train_batch_size",
        "8",
        "--max_completion_length",
        "64",
        "--save_strategy",
        "no",
        *extra,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cellduality_gpu_check"))
    parser.add_argument("--vllm", action="store_true", help="also a vLLM colocate dual-GRPO run")
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()

    import torch

    from cellduality.train.grpo import parse_args as grpo_args
    from cellduality.train.grpo import run_grpo
    from cellduality.train.sft import parse_args as sft_args
    from cellduality.train.sft import run_sft

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --cpu-smoke to check the script on a CPU")
    device = ["--use_cpu", "true", "--bf16", "false"] if args.cpu_smoke else ["--bf16", "true"]
    dtype = "float32" if args.cpu_smoke else "bfloat16"
    model = build_model(args.out, 2 if args.cpu_smoke else args.layers, args.cpu_smoke)
    sft_dir = args.out / "sft"
    run_sft(
        *sft_args(
            [
                "--config",
                str(REPO / "recipes/tiny-cpu/sft.yaml"),
                "--model_name_or_path",
                str(model),
                "--build_tiny_model",
                "false",
                "--dtype",
                dtype,
                "--output_dir",
                str(sft_dir),
                "--sft_limit",
                "64",
                "--num_train_epochs",
                "1",
                "--learning_rate",
                "1e-5",
                "--per_device_train_batch_size",
                "8",
                "--save_strategy",
                "no",
                *device,
            ]
        )
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = run_grpo(
        *grpo_args(
            grpo_argv(
                args,
                sft_dir,
                dtype,
                "grpo",
                "--dual_max_new_tokens",
                "32",
                "--gradient_checkpointing",
                "true",
                *device,
            )
        )
    )
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "step_time" in h]
    step = statistics.median(h["step_time"] for h in logs[1:] or logs)
    tokens = trainer.state.log_history[-2].get("num_tokens") if len(trainer.state.log_history) > 1 else None
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)",
        "layers": args.layers,
        "steps": args.steps,
        "median_step_time_s": round(step, 3),
        "tokens_per_s": round(float(tokens) / wall, 1) if tokens else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if torch.cuda.is_available()
        else None,
        "dual_prompts_per_call": [h["prompts"] for h in trainer.cellduality_dual.history],
    }
    if args.vllm:
        result["vllm_colocate"] = vllm_step(args, sft_dir, dtype, device)
    print(json.dumps(result, indent=1))
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))


def vllm_step(args: argparse.Namespace, sft_dir: Path, dtype: str, device: list[str]) -> dict:
    """A few dual-GRPO steps with vLLM colocate generation (rollouts and duals), timed."""
    from cellduality.train.grpo import parse_args as grpo_args
    from cellduality.train.grpo import run_grpo

    start = time.perf_counter()
    trainer = run_grpo(
        *grpo_args(
            grpo_argv(
                args,
                sft_dir,
                dtype,
                "grpo_vllm",
                "--use_vllm",
                "true",
                "--vllm_mode",
                "colocate",
                "--vllm_gpu_memory_utilization",
                "0.35",
                "--dual_do_sample",
                "true",
                "--dual_temperature",
                "0.7",
                "--dual_max_new_tokens",
                "32",
                *device,
            )
        )
    )
    logs = [h for h in trainer.state.log_history if "step_time" in h]
    generator = trainer.cellduality_dual.generate
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "median_step_time_s": round(statistics.median(h["step_time"] for h in logs[1:] or logs), 3),
        "dual_calls": generator.calls,
        "dual_sampling": generator.sampling(),
        "dual_reward_mean": [h.get("rewards/dual/mean") for h in logs],
    }


if __name__ == "__main__":
    main()
