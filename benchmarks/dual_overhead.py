"""Cost of the self-supervised dual reward: GRPO step time with ``dual`` against ``oracle``.

Both runs use the same tiny model, data and settings (group size 8, forward completions up to 64
tokens, dual completions up to 32), in this process. The oracle reward needs no extra generation; the
dual reward generates one batched dual completion per forward completion with the policy. To make the
dual path do real work, the tiny model is first fine-tuned for a short while on offline-teacher traces
so that most forward completions parse (a completion that does not parse gets no dual prompt).
Learning rate 0, so every round trains nothing and generates the same completions: the arms run
``--rounds`` times, alternating which goes first, and the ratio is the median of the rounds' ratios
(one run's step times move by about a tenth on a shared machine). Target: dual / oracle <= 1.3.

    python benchmarks/dual_overhead.py [--steps 8] [--rounds 3] [--out /tmp/cellduality_dual_overhead]
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both arms, alternating")
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
    oracle_args = ["--reward_mode", "oracle", "--reward_funcs", "format", "oracle"]
    ratios, duals, oracles = [], [], []
    for r in range(args.rounds):  # the arms alternate, each first in turn: a change of load hits both
        arms = ("dual", "oracle") if r % 2 == 0 else ("oracle", "dual")
        times = {}
        for arm in arms:
            extra = oracle_args if arm == "oracle" else []
            trainer = run_grpo(*grpo_args([*common, "--output_dir", str(args.out / arm), *extra]))
            times[arm] = statistics.median(_step_times(trainer))
            if arm == "dual":
                dual = trainer
        duals.append(times["dual"])
        oracles.append(times["oracle"])
        ratios.append(times["dual"] / times["oracle"])
        print(
            f"round {r + 1}/{args.rounds}: dual {times['dual']:.3f} s, oracle {times['oracle']:.3f} s, "
            f"ratio {ratios[-1]:.2f}",
            flush=True,
        )
    history = dual.cellduality_dual.history
    prompts = sum(h["prompts"] for h in history)
    parsed = prompts / max(1, len(history) * 8)
    ratio = statistics.median(ratios)
    generated = sum(h.get("generated", h["prompts"]) for h in history)
    steps = len(_step_times(dual))
    print(
        f"dual prompts per forward completion: {parsed:.2f} ({generated} distinct ones generated of {prompts})"
    )
    print(
        f"GRPO step with dual reward  : {statistics.median(duals):.3f} s (median of {steps} steps, then of rounds)"
    )
    print(
        f"GRPO step with oracle reward: {statistics.median(oracles):.3f} s (median of {steps} steps, then of rounds)"
    )
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(
        f"ratio dual / oracle         : {ratio:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f} over "
        f"{args.rounds} rounds; target <= {TARGET}: {verdict})"
    )


if __name__ == "__main__":
    main()
