"""Cost of the self-supervised dual reward: GRPO step time with ``dual`` against ``oracle``.

Both runs use the same tiny model, data and settings (group size 8, forward completions up to 64
tokens, dual completions up to 32), in this process. The oracle reward needs no extra generation; the
dual reward generates one batched dual completion per forward completion with the policy. To make the
dual path do real work, the tiny model is first fine-tuned for a short while on offline-teacher traces
so that most forward completions parse (a completion that does not parse gets no dual prompt).
Target: dual / oracle <= 1.3.

    python benchmarks/dual_overhead.py [--steps 8] [--out /tmp/cellduality_dual_overhead]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.3


def _step_times(trainer) -> list[float]:
    """Per-step wall time TRL logs, skipping the first step (warm-up)."""
    times = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
    return times[1:] if len(times) > 1 else times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cellduality_dual_overhead"))
    args = parser.parse_args()

    from cellduality.train.grpo import parse_args as grpo_args
    from cellduality.train.grpo import run_grpo
    from cellduality.train.sft import parse_args as sft_args
    from cellduality.train.sft import run_sft

    sft_dir = args.out / "sft"
    if not (sft_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        run_sft(
            *sft_args(
                [
                    "--config",
                    str(REPO / "recipes/tiny-cpu/sft.yaml"),
                    "--output_dir",
                    str(sft_dir),
                    "--model_name_or_path",
                    str(args.out / "model"),
                    "--sft_limit",
                    "200",
                    "--num_train_epochs",
                    "8",
                    "--tiny_hidden_size",
                    "128",
                    "--tiny_num_layers",
                    "4",
                    "--learning_rate",
                    "3e-3",
                    "--per_device_train_batch_size",
                    "32",
                ]
            )
        )
        print(f"SFT warm-up of the tiny model: {time.perf_counter() - t0:.0f} s")

    common = [
        "--config",
        str(REPO / "recipes/tiny-cpu/grpo_dual.yaml"),
        "--model_name_or_path",
        str(sft_dir),
        "--build_tiny_model",
        "false",
        "--prepared_dir",
        str(args.out / "prepared"),
        "--num_generations",
        "8",
        "--per_device_train_batch_size",
        "8",
        "--max_completion_length",
        "64",
        "--dual_max_new_tokens",
        "32",
        "--max_steps",
        str(args.steps),
        "--save_strategy",
        "no",
        "--learning_rate",
        "0",
    ]
    dual = run_grpo(*grpo_args([*common, "--output_dir", str(args.out / "dual")]))
    oracle = run_grpo(
        *grpo_args(
            [
                *common,
                "--output_dir",
                str(args.out / "oracle"),
                "--reward_mode",
                "oracle",
                "--reward_funcs",
                "format",
                "oracle",
            ]
        )
    )
    t_dual = statistics.median(_step_times(dual))
    t_oracle = statistics.median(_step_times(oracle))
    history = dual.cellduality_dual.history
    prompts = sum(h["prompts"] for h in history)
    parsed = prompts / max(1, len(history) * 8)
    ratio = t_dual / t_oracle
    generated = sum(h.get("generated", h["prompts"]) for h in history)
    print(
        f"dual prompts per forward completion: {parsed:.2f} ({generated} distinct ones generated of {prompts})"
    )
    print(f"GRPO step with dual reward  : {t_dual:.3f} s (median of {len(_step_times(dual))} steps)")
    print(f"GRPO step with oracle reward: {t_oracle:.3f} s (median of {len(_step_times(oracle))} steps)")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"ratio dual / oracle         : {ratio:.2f} (target <= {TARGET}: {verdict})")


if __name__ == "__main__":
    main()
