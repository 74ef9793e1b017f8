"""The GPU check in one command: SFT, dual GRPO, oracle GRPO and ZeRO-2 on one GPU, one JSON out.

Made for a GPU machine with no network whose Python holds torch, transformers, accelerate, peft,
numpy, scipy and pandas. What else the check needs (trl, datasets, anndata, scanpy, openai,
deepspeed and whatever of theirs the machine lacks) comes from wheels fetched beforehand, on a machine
with network, into the repository's ignored ``.whl/`` folder by ``benchmarks/fetch_gpu_check_wheels.sh``
from a list: ``benchmarks/gpu_check_wheels.txt`` for a Python with only those seven packages (184 MiB
for Python 3.11), ``benchmarks/gpu_check_wheels_device.txt`` for the device machines' image, which
has most of the heavy ones (21 MiB for Python 3.12). Then:

    python benchmarks/gpu_check.py --out gpu_check_out          # on the GPU machine, about 5 minutes
    python benchmarks/gpu_check.py --out /tmp/gc --cpu-smoke    # tiny shapes on a CPU: the script runs

What it does, each phase timed and recorded even when a later one fails:

1. installs ``REQUIREMENTS`` from ``.whl/`` (``pip install --no-index --find-links``: the machine's
   own packages where they satisfy, the folder's wheels where not; nothing else is reached) and
   imports CellDuality from this checkout (the package itself is not installed);
2. builds a ~0.5B Llama from a config (hidden 1536, 20 layers, 12 heads / 4 key-value heads,
   intermediate 4096; no download) with CellDuality's gene-symbol tokenizer, in bf16;
3. SFT steps in bf16 with gradient checkpointing on offline-teacher traces (embedded pbmc68k), at a
   learning rate high enough (1e-4) for a model from a config to learn the answer format;
4. dual GRPO and oracle GRPO steps from that SFT model on the Hugging Face generation path, the
   same data and batch, so the dual/oracle step-time ratio is the cost of the dual reward's
   generation;
5. SFT steps under DeepSpeed ZeRO-2 on the one GPU (``accelerate launch --use_deepspeed``), when
   DeepSpeed installs.

``<out>/gpu_check.json`` holds the device and versions, per phase the steps, median step time,
tokens/s and peak GPU memory, per reward whether it was ever non-zero, the dual/oracle ratio, the
wall time and whether everything fit in ``--budget-min`` (8 minutes). The JSON is rewritten after
every phase, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
#: what the check installs, at the versions of the tested stack (the rest of the stack's packages the
#: machine has, or the wheel folder holds: benchmarks/gpu_check_wheels*.txt)
REQUIREMENTS = (
    "trl==1.16.0",
    "datasets==5.2.0",
    "anndata==0.12.19",
    "scanpy==1.11.5",
    "openai==3.52.0",
    "scikit-learn",
    "matplotlib",
)
DEEPSPEED = "deepspeed==0.19.8"
#: import name -> what the check needs importable (beyond the machine's torch/transformers/...)
NEEDED = ("trl", "datasets", "anndata", "scanpy", "yaml", "rich", "tqdm", "openai", "sklearn", "matplotlib")
#: a ~0.5B Llama (20 x 25M per layer + embeddings of the small gene vocabulary)
HALF_B = {
    "hidden_size": 1536,
    "intermediate_size": 4096,
    "num_hidden_layers": 20,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def missing_modules() -> list[str]:
    return [name for name in NEEDED if importlib.util.find_spec(name) is None]


def install_from_wheels(wheels: Path) -> dict[str, Any]:
    """Install ``REQUIREMENTS`` from ``wheels`` only (no index). pip takes each dependency from the
    machine where an installed version satisfies it and from the folder where not, so the folder
    needs only what the machine lacks (the lists in ``benchmarks/gpu_check_wheels*.txt``)."""
    before = missing_modules()
    if not before:
        return {"needed": [], "installed": False}
    if not wheels.is_dir() or not any(wheels.rglob("*.whl")):
        raise SystemExit(
            f"gpu_check: {', '.join(before)} not importable and no wheels in {wheels}: run "
            "benchmarks/fetch_gpu_check_wheels.sh on a machine with network first"
        )
    # the fetch script splits the wheels into parts (.whl/part-N) that are carried over one by one
    links = [str(d) for d in (wheels, *sorted(p for p in wheels.iterdir() if p.is_dir()))]
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        *(a for d in links for a in ("--find-links", d)),
    ]
    start = time.perf_counter()
    proc = subprocess.run([*pip, *REQUIREMENTS], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"gpu_check: installing from {wheels} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    ds = subprocess.run([*pip, DEEPSPEED], capture_output=True, text=True)  # optional: ZeRO-2 phase only
    importlib.invalidate_caches()
    return {
        "needed": before,
        "installed": True,
        "seconds": round(time.perf_counter() - start, 1),
        "deepspeed": "installed" if ds.returncode == 0 else (ds.stdout + ds.stderr).strip().splitlines()[-1:],
        "still_missing": missing_modules(),
    }


def build_model(work: Path, cpu_smoke: bool) -> dict[str, Any]:
    """CellDuality's gene-symbol tokenizer with a ~0.5B Llama (tiny for ``--cpu-smoke``) from a config."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from cellduality.data import load_dataset
    from cellduality.modeling import ensure_tiny_model
    from cellduality.tasks import TaskConfig, build_tasks
    from cellduality.train.common import texts_of_tasks

    source = work / "tokenizer_source"
    prepared = build_tasks(load_dataset("pbmc68k"), config=TaskConfig(top_k=16))
    ensure_tiny_model(source, prepared.genes, texts_of_tasks(prepared))
    tok = AutoTokenizer.from_pretrained(source)
    shape = dict(HALF_B, **(TINY | {"num_key_value_heads": 2} if cpu_smoke else {}))
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32 if cpu_smoke else torch.bfloat16)
    target = work / "model"
    model.save_pretrained(target)
    tok.save_pretrained(target)
    model.generation_config.save_pretrained(target)
    return {"_path": target, "parameters": sum(p.numel() for p in model.parameters())}


def device_flags(cpu_smoke: bool) -> list[str]:
    if cpu_smoke:
        return ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32"]
    return ["--use_cpu", "false", "--bf16", "true", "--dtype", "bfloat16"]


def sft_argv(work: Path, model: Path, out: str, steps: int, cpu_smoke: bool, lr: float = 1e-4) -> list[str]:
    """The tiny SFT recipe with the ~0.5B model: bf16, gradient checkpointing, ``steps`` steps. The
    learning rate is high for SFT on purpose: a model from a config must learn the answer format in a
    minute for the GRPO phases' rewards to be anything but zero."""
    return [
        "--config",
        str(REPO / "recipes/tiny-cpu/sft.yaml"),
        "--model_name_or_path",
        str(model),
        "--build_tiny_model",
        "false",
        "--output_dir",
        str(work / out),
        "--prepared_dir",
        str(work / "prepared"),
        "--sft_limit",
        "128",
        "--max_steps",
        str(steps),
        "--learning_rate",
        str(lr),
        "--per_device_train_batch_size",
        "8",
        "--gradient_checkpointing",
        "true",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--disable_tqdm",
        "true",
        *device_flags(cpu_smoke),
    ]


def grpo_argv(work: Path, sft: Path, recipe: str, out: str, steps: int, cpu_smoke: bool) -> list[str]:
    return [
        "--config",
        str(REPO / f"recipes/tiny-cpu/{recipe}.yaml"),
        "--model_name_or_path",
        str(sft),
        "--build_tiny_model",
        "false",
        "--output_dir",
        str(work / out),
        "--prepared_dir",
        str(work / "prepared"),
        "--max_steps",
        str(steps),
        "--num_generations",
        "8",
        "--per_device_train_batch_size",
        "8",
        "--max_completion_length",
        "64",
        "--gradient_checkpointing",
        "true",
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--monitor_rows",
        "0",
        "--disable_tqdm",
        "true",
        *device_flags(cpu_smoke),
    ]


class Phases:
    """Runs the phases in order, each timed; writes the JSON after each; stops starting new ones
    once the budget is spent (what was skipped, and why, is in the JSON)."""

    def __init__(self, out: Path, budget_s: float, result: dict[str, Any]) -> None:
        self.out, self.budget_s, self.result = out, budget_s, result
        self.start = time.perf_counter()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def write(self) -> None:
        self.result["wall_s"] = round(time.perf_counter() - self.start, 1)
        self.result["within_budget"] = self.result["wall_s"] <= self.budget_s
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=1, default=str) + "\n")

    def run(self, name: str, fn, *args: Any) -> Any:
        if self.left() <= 0:
            self.result[name] = {"skipped": "time budget spent"}
            self.write()
            return None
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        try:
            value = fn(*args)
            entry = value if isinstance(value, dict) else {}
        except Exception as exc:  # a failed phase is a result too: the others still run
            value, entry = (
                None,
                {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-4000:]},
            )
        entry["phase_s"] = round(time.perf_counter() - began, 1)
        if torch.cuda.is_available():
            entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.result[name] = {k: v for k, v in entry.items() if not k.startswith("_")}
        self.write()
        print(f"gpu_check: {name}: {json.dumps(self.result[name], default=str)[:400]}", flush=True)
        return value


def _last(history: list[dict[str, Any]], key: str) -> Any:
    return next((h[key] for h in reversed(history) if key in h), None)


def train_figures(history: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Steps, step time and tokens/s from a trainer's ``log_history``."""
    runtime = _last(history, "train_runtime")
    tokens = _last(history, "num_tokens")
    step_times = [h["step_time"] for h in history if isinstance(h.get("step_time"), (int, float))]
    out: dict[str, Any] = {"steps": steps, "train_runtime_s": runtime, "num_tokens": tokens}
    if step_times:  # GRPO logs each step's time; the first one includes warm-up
        out["median_step_time_s"] = round(statistics.median(step_times[1:] or step_times), 3)
    elif runtime:
        out["mean_step_time_s"] = round(runtime / steps, 3)
    if runtime and tokens:
        out["tokens_per_s"] = round(float(tokens) / runtime, 1)
    rewards = {}
    for key in {k for h in history for k in h if k.startswith("rewards/") and k.endswith("/mean")}:
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        rewards[key.split("/")[1]] = {"mean": round(statistics.fmean(values), 4), "non_zero": any(values)}
    if rewards:
        out["rewards"] = rewards
    return out


def phase_sft(work: Path, model: Path, steps: int, cpu_smoke: bool, lr: float) -> dict[str, Any]:
    from cellduality.train.sft import parse_args, run_sft

    trainer = run_sft(*parse_args(sft_argv(work, model, "sft", steps, cpu_smoke, lr)))
    return train_figures(trainer.state.log_history, steps)


def phase_grpo(work: Path, recipe: str, steps: int, cpu_smoke: bool) -> dict[str, Any]:
    from cellduality.train.grpo import parse_args, run_grpo

    trainer = run_grpo(*parse_args(grpo_argv(work, work / "sft", recipe, recipe, steps, cpu_smoke)))
    out = train_figures(trainer.state.log_history, steps)
    dual = trainer.cellduality_dual
    if dual is not None:
        out["dual_generation_calls"] = dual.generate.generations
        out["dual_prompts_per_call"] = [h["prompts"] for h in dual.history]
    return out


def phase_zero2(work: Path, model: Path, steps: int, timeout_s: float) -> dict[str, Any]:
    """SFT under DeepSpeed ZeRO-2 on the one GPU, through ``accelerate launch`` as a user runs it."""
    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "DeepSpeed is not installed (its wheel did not install)"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--use_deepspeed",
        "--zero_stage",
        "2",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16",
        "--dynamo_backend",
        "no",
        "-m",
        "cellduality.train.sft",
        *sft_argv(work, model, "sft_zero2", steps, cpu_smoke=False),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=max(30.0, timeout_s))
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "trace": (proc.stdout + proc.stderr)[-4000:]}
    # with disable_tqdm the trainer prints each log entry as a dict: read them back
    history = []
    for line in proc.stdout.splitlines():
        if line.startswith("{") and line.endswith("}"):
            try:
                history.append(ast.literal_eval(line))
            except (ValueError, SyntaxError):
                continue
    out = train_figures(history, steps)
    out["deepspeed_in_log"] = "deepspeed" in (proc.stdout + proc.stderr).lower()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json (and the runs)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the fetched wheels (default: .whl/)")
    parser.add_argument(
        "--work", type=Path, help="where the runs' models and data go (default: <out>/runs; large)"
    )
    parser.add_argument("--sft-steps", type=int, default=60)
    parser.add_argument("--sft-lr", type=float, default=1e-4)
    parser.add_argument("--grpo-steps", type=int, default=6)
    parser.add_argument("--zero2-steps", type=int, default=5)
    parser.add_argument("--budget-min", type=float, default=8.0)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on a CPU: the script runs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"command": " ".join(sys.argv), "python": platform.python_version()}
    phases = Phases(args.out, args.budget_min * 60, result)
    result["install"] = install_from_wheels(args.wheels)
    phases.write()
    sys.path.insert(0, str(REPO))

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here: run with --cpu-smoke to check the script on a CPU", file=sys.stderr
        )
        return 2
    from importlib.metadata import version

    result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (smoke)"
    result["versions"] = {
        p: version(p) for p in ("torch", "transformers", "trl", "accelerate", "peft", "datasets")
    } | {"deepspeed": version("deepspeed") if importlib.util.find_spec("deepspeed") else None}
    work = args.work or args.out / "runs"
    built = phases.run("model", build_model, work, args.cpu_smoke)
    if built is None or "_path" not in built:
        return 1
    model = built["_path"]
    sft = phases.run("sft_bf16_gc", phase_sft, work, model, args.sft_steps, args.cpu_smoke, args.sft_lr)
    if sft is None:
        return 1
    dual = phases.run("grpo_dual_hf", phase_grpo, work, "grpo_dual", args.grpo_steps, args.cpu_smoke)
    oracle = phases.run("grpo_oracle_hf", phase_grpo, work, "grpo_oracle", args.grpo_steps, args.cpu_smoke)
    if dual and oracle and dual.get("median_step_time_s") and oracle.get("median_step_time_s"):
        result["dual_over_oracle_step_time"] = round(
            dual["median_step_time_s"] / oracle["median_step_time_s"], 2
        )
    if args.cpu_smoke or not torch.cuda.is_available():
        result["zero2_single_gpu"] = {
            "skipped": "no CUDA GPU (DeepSpeed is refused on CPU by the launch guard)"
        }
    else:
        phases.run("zero2_single_gpu", phase_zero2, work, model, args.zero2_steps, phases.left())
    phases.write()
    print(f"gpu_check: wrote {args.out / 'gpu_check.json'} ({result['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
