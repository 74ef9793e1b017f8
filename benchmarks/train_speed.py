"""CPU training throughput of the demo's SFT and dual GRPO: the old settings against the new, in one run.

Throughput is what TRL logs: ``num_tokens / train_runtime`` (prompt and completion tokens that are not
padding, per second of training). Each stage runs the demo's own code (``cellduality.stages.sft`` and
``grpo`` with the full demo's recipes, ``recipes/demo/full``: pbmc68k, scad_plx4720 and glioblastoma_panobinostat, 16-gene
sentences, the tiny Llama 128 wide with 4 layers, SFT batch 32, GRPO 8 prompts x 4 completions with
the self-supervised dual reward) for a few optimizer steps, in a fresh process per setting, the
settings interleaved ``--rounds`` times so that a change of load on the machine hits all of them; each
ratio is taken round by round and printed as min / median / max, next to the target of 2x.

- old: TRL's fused LM head projects every position on the CPU (``CELLDUALITY_COMPACT_LM_HEAD=0``), the
  GRPO rollouts grow their KV cache token by token, torch's default threads (one per core).
- new: the head projects the labelled positions only (``cellduality.train.lm_head``, the default), the
  rollouts use a static KV cache (the demo's ``cache_implementation="static"``), and GRPO passes each
  prompt once for the completions that share it, in the rollouts' prefill and in the loss
  (``cellduality.train.shared_prompts``), and every decoding step after a generation's prefill (the
  rollouts' and the dual's) skips the module machinery (``cellduality.modeling.decode``, bit-identical
  logits), the fused head's tiles are folded in fewer passes (``cellduality.train.head_tiles``,
  bit-identical), and a sampled token's exponential variates are made in bulk
  (``cellduality.modeling.draws``, torch's own draws): the same loss, gradients and samples, so the
  benchmark also
  prints the training losses (SFT) and rewards (GRPO) of each setting, which agree with old's up to
  float rounding.
- new with TRL's head tiles: new with TRL's own torch folds of the fused LM head's tiles
  (``CELLDUALITY_LEAN_HEAD_TILES=0``), so that new / this is what ``cellduality.train.head_tiles`` adds.
- new with torch's exponential_ (GRPO): new with ``torch.multinomial``'s own serial variates
  (``CELLDUALITY_FAST_DRAWS=0``), so that new / this is what ``cellduality.modeling.draws`` adds.
- new with HF decoding (GRPO): new with each decoding step through the model's own forward
  (``CELLDUALITY_LEAN_DECODE=0``), so that new / this is what ``cellduality.modeling.decode`` adds.
- new + inverse CDF (GRPO): new, and the rollouts' tokens drawn by inverse CDF (``cpu_sampler:
  inverse_cdf``, opt-in, ``cellduality.train.sampling``): the same distribution, other draws, so its
  rewards differ from the first step on; docs/results.md ("Speed and results") compares six seeds.
- old 1-thread / new 1-thread: the same with ``OMP_NUM_THREADS=1`` (one torch thread). On cores that
  other processes share, torch's threads wait for each other at each of a step's many small parallel
  regions, so there new / old is measured best with one thread each, and one thread is several times
  faster than two; on idle cores, two may be faster.

GRPO starts from an SFT checkpoint made once in ``--out`` (``--warm-steps`` SFT steps, enough for most
forward answers to parse, so that the dual reward generates as it does in the demo); the monitor split
keeps the recipe's cadence (``monitor_steps``, so never in a short run). Tokens per CPU second (every thread
of the process, during ``train``) are printed too: they move less than wall time when the machine is
shared, but count threads that spin while waiting.

    python benchmarks/train_speed.py [--sft-steps 40] [--grpo-steps 16] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's cellduality, also when another one is installed

TARGET = 2.0
#: per setting, the environment of its process; "new" is what cellduality does by default
#: ``_OLD_CACHE``: the child gives the GRPO rollouts the dynamic KV cache (before the demo's static one)
_OLD_CACHE = "CELLDUALITY_BENCH_DYNAMIC_CACHE"
#: ``_SAMPLER``: the GRPO recipe's ``cpu_sampler`` for the child (the demo's recipe: ``torch``)
_SAMPLER = "CELLDUALITY_BENCH_CPU_SAMPLER"
#: "old": every speed-up of the issue turned off
_OLD = {
    "CELLDUALITY_COMPACT_LM_HEAD": "0",
    _OLD_CACHE: "1",
    "CELLDUALITY_SHARED_PROMPTS": "0",
    "CELLDUALITY_LEAN_DECODE": "0",
    "CELLDUALITY_LEAN_HEAD_TILES": "0",
    "CELLDUALITY_FAST_DRAWS": "0",
}
_NEW = {"CELLDUALITY_COMPACT_LM_HEAD": "1"}
SETTINGS: dict[str, dict[str, str]] = {
    "old": _OLD,
    "new": _NEW,
    "new with HF decoding": {**_NEW, "CELLDUALITY_LEAN_DECODE": "0"},
    "new with TRL's head tiles": {**_NEW, "CELLDUALITY_LEAN_HEAD_TILES": "0"},
    "new with torch's exponential_": {**_NEW, "CELLDUALITY_FAST_DRAWS": "0"},
    # the opt-in sampler of GRPO recipes (cpu_sampler: inverse_cdf): same distribution, other draws
    "new + inverse CDF": {**_NEW, _SAMPLER: "inverse_cdf"},
    # torch's intra-op threads: its default is one per core; on cores other processes share, a step's
    # many small parallel regions wait for a thread that is not running
    "old 1-thread": {**_OLD, "OMP_NUM_THREADS": "1"},
    "new 1-thread": {**_NEW, "OMP_NUM_THREADS": "1"},
}
#: settings that differ from "new" only in GRPO's generation (SFT generates nothing)
GRPO_ONLY = frozenset({"new + inverse CDF", "new with HF decoding", "new with torch's exponential_"})
COMPARISONS = (
    ("new", "old"),
    ("new", "new with HF decoding"),
    ("new", "new with TRL's head tiles"),
    ("new", "new with torch's exponential_"),
    ("new + inverse CDF", "old"),
    ("new + inverse CDF", "new"),
    ("new 1-thread", "old 1-thread"),
    ("new 1-thread", "old"),
)


def _folders(work: Path) -> list[Path]:
    return [Path(f) for f in json.loads((work / "folders.json").read_text())]


def _throughput(trainer: Any, cpu_s: float) -> dict[str, Any]:
    """TRL's own figures (tokens it counted over ``train_runtime``) and the process's CPU seconds."""
    history = trainer.state.log_history
    end = next(h for h in history if "train_runtime" in h)
    steps = [h for h in history if "loss" in h and "train_runtime" not in h]
    tokens = int(max(h.get("num_tokens", 0) for h in history))
    return {
        "tokens": tokens,
        "runtime_s": float(end["train_runtime"]),
        "tokens_per_s": tokens / float(end["train_runtime"]),
        "tokens_per_cpu_s": tokens / cpu_s,
        "losses": [float(h["loss"]) for h in steps],
        "rewards": [float(h["reward"]) for h in steps if "reward" in h],
    }


def _child(stage: str, work: Path, steps: int) -> None:
    import transformers

    from cellduality import stages
    from cellduality.demo import FULL

    cpu: dict[str, float] = {}
    train = transformers.Trainer.train

    def timed_train(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.process_time()  # every thread of this process, as train_runtime's span
        try:
            return train(self, *args, **kwargs)
        finally:
            cpu["s"] = time.process_time() - start

    transformers.Trainer.train = timed_train  # type: ignore[method-assign]
    name = f"run-{stage}-{os.getpid()}"
    if stage == "sft":
        trainer = stages.sft(
            FULL, work, _folders(work), 0, name=name, max_steps=steps, logging_steps=1, disable_tqdm=True
        )
    else:
        trainer = _grpo_steps(work, steps, name)
    print("RESULT " + json.dumps(_throughput(trainer, cpu["s"])), flush=True)
    shutil.rmtree(work / name, ignore_errors=True)  # the checkpoint of a few steps is not needed


def _grpo_steps(work: Path, steps: int, name: str) -> Any:
    """The demo's dual GRPO (``cellduality.stages.grpo`` with ``recipes/demo/full/grpo_dual.yaml``) for
    ``steps`` steps from ``work/sft``; the warm-up shrinks with the run (a tenth of it, at most the
    recipe's 5 steps), the monitor keeps the recipe's cadence (it never checks in a short run)."""
    from cellduality import stages
    from cellduality.demo import FULL

    plan = FULL
    if os.environ.get(_OLD_CACHE) == "1":  # the rollouts' dynamic KV cache, TRL's default
        plan = plan.replace("grpo_dual", cache_implementation=None)
    if os.environ.get(_SAMPLER):
        plan = plan.replace("grpo_dual", cpu_sampler=os.environ[_SAMPLER])
    return stages.grpo(
        plan,
        work,
        _folders(work),
        0,
        arm="dual",
        name=name,
        max_steps=steps,
        warmup_steps=min(5, steps // 10),
    )


def _setup(work: Path, warm_steps: int) -> None:
    """Prepared data, tiny model, SFT traces and the SFT checkpoint GRPO starts from, made once."""
    if (work / "sft" / "model.safetensors").exists() and (work / "folders.json").exists():
        return
    from rich.console import Console

    from cellduality import stages
    from cellduality.demo import FULL

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "folders.json").exists():
        folders = [str(f) for f in stages.prepare(FULL, work, 0, Console())]
        (work / "folders.json").write_text(json.dumps(folders))
    start = time.perf_counter()
    stages.sft(FULL, work, _folders(work), 0, max_steps=warm_steps, disable_tqdm=True)
    print(
        f"setup: SFT checkpoint for GRPO ({warm_steps} steps) in {time.perf_counter() - start:.0f} s",
        flush=True,
    )


def _run(stage: str, setting: str, work: Path, steps: int) -> dict[str, Any]:
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, **SETTINGS[setting], "PYTHONPATH": path}
    cmd = [sys.executable, __file__, "--child", stage, "--steps", str(steps), "--out", str(work)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} ({setting}) failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _spread(values: list[float]) -> str:
    return f"min {min(values):.2f}x, median {statistics.median(values):.2f}x, max {max(values):.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft-steps", type=int, default=40)
    parser.add_argument("--grpo-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=150)
    parser.add_argument("--stages", default="sft,grpo")
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help="comma-separated, of: " + ", ".join(SETTINGS)
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/cellduality_train_speed"))
    parser.add_argument("--child", choices=["sft", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.out, args.steps)
        return
    _setup(args.out, args.warm_steps)
    stages = [s for s in args.stages.split(",") if s]
    names = [n.strip() for n in args.settings.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; known: {list(SETTINGS)}")
    every = names
    for stage in stages:
        # the sampler and the decoding change GRPO's rollouts only: SFT does not run them
        names = [n for n in every if stage == "grpo" or n not in GRPO_ONLY]
        pairs = [(a, b) for a, b in COMPARISONS if a in names and b in names]
        steps = args.sft_steps if stage == "sft" else args.grpo_steps
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        ratios = {pair: {"wall": [], "cpu": []} for pair in pairs}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # each setting goes first in turn
            for setting in order:
                results[setting].append(_run(stage, setting, args.out, steps))
            line = [
                f"{name} {results[name][-1]['tokens_per_s']:,.0f} tokens/s "
                f"({results[name][-1]['tokens_per_cpu_s']:,.0f} per CPU s)"
                for name in names
            ]
            print(f"{stage} round {r + 1}/{args.rounds}: " + "; ".join(line), flush=True)
            for (a, b), got in ratios.items():
                new, ref = results[a][-1], results[b][-1]
                got["wall"].append(new["tokens_per_s"] / ref["tokens_per_s"])
                got["cpu"].append(new["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"])
        print(f"\n{stage}: {args.rounds} rounds of {steps} steps, min / median / max of the per-round ratios")
        for (a, b), got in ratios.items():
            verdict = "met" if statistics.median(got["wall"]) >= TARGET else "NOT met"
            print(
                f"{stage}: [{a}] / [{b}]: tokens/s (num_tokens / train_runtime) {_spread(got['wall'])} "
                f"(target >= {TARGET:.1f}x: {verdict}); tokens per CPU second {_spread(got['cpu'])}"
            )
        for key in ("losses",) if stage == "sft" else ("rewards", "losses"):
            reference = results[names[0]][0][key]
            for name in names:
                other = results[name][0][key]
                diff = max((abs(a - b) for a, b in zip(reference, other, strict=False)), default=float("nan"))
                print(
                    f"{stage}: {key} per step, {name}: {[round(x, 4) for x in other]} (vs {names[0]}: largest difference {diff:.2g})"
                )
        print()


if __name__ == "__main__":
    main()
