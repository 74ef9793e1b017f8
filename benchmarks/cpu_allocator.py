"""CPU training with and without keeping freed memory in the heap (``cellduality.train.allocator``).

The demo's SFT (its data: pbmc68k, scad_plx4720 and glioblastoma_panobinostat, 16-gene sentences, the
offline teacher's traces, the tiny Llama 128 wide with 4 layers, batch 32) runs ``--steps`` optimizer
steps in a fresh process per setting, the two settings interleaved ``--rounds`` times so that a load
change on the machine hits both. Printed per setting: the median seconds per step, CPU seconds per step
(user, kernel) and minor page faults per step; then the ratio off / on of wall time and of CPU time.

    python benchmarks/cpu_allocator.py [--steps 12] [--rounds 3] [--out /tmp/cellduality_allocator]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _demo_sft(out: Path, work: Path, steps: int):
    """The demo's SFT (``cellduality.stages.sft``, recipes/demo/full), ``steps`` optimizer steps into ``out``."""
    from cellduality import stages
    from cellduality.demo import FULL

    folders = [Path(f) for f in json.loads((work / "folders.json").read_text())]
    return stages.sft(
        FULL, work, folders, 0, name=out.name, max_steps=steps, logging_steps=10_000, disable_tqdm=True
    )


def _child(work: Path, steps: int, tag: str) -> None:
    import torch

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    trainer = _demo_sft(work / f"run-{tag}-{os.getpid()}", work, steps)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    runtime = next(h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h)
    print(
        "RESULT "
        + json.dumps(
            {
                "step_s": runtime / steps,
                "user_s": (after.ru_utime - before.ru_utime) / steps,
                "sys_s": (after.ru_stime - before.ru_stime) / steps,
                "faults": (after.ru_minflt - before.ru_minflt) / steps,
                "wall_s": wall,
            }
        )
    )


def _setup(work: Path) -> None:
    """Prepared data, tiny model and SFT traces, made once (the first process builds what is missing)."""
    if (work / "folders.json").exists():
        return
    from rich.console import Console

    from cellduality import stages
    from cellduality.demo import FULL

    work.mkdir(parents=True, exist_ok=True)
    folders = [str(f) for f in stages.prepare(FULL, work, 0, Console())]
    (work / "folders.json").write_text(json.dumps(folders))
    _demo_sft(work / "setup-run", work, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cellduality_allocator"))
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.out, args.steps, args.child)
        return
    _setup(args.out)
    results: dict[str, list[dict[str, float]]] = {"off": [], "on": []}
    for r in range(args.rounds):
        for setting in ("off", "on"):
            env = {**os.environ, "CELLDUALITY_KEEP_HEAP": "1" if setting == "on" else "0"}
            cmd = [
                sys.executable,
                __file__,
                "--child",
                setting,
                "--steps",
                str(args.steps),
                "--out",
                str(args.out),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
            results[setting].append(json.loads(line.removeprefix("RESULT ")))
            print(
                f"round {r + 1}/{args.rounds} heap kept {setting}: {results[setting][-1]['step_s']:.3f} s/step",
                flush=True,
            )
    med = {s: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for s, rs in results.items()}
    print(
        f"\n{'heap kept':>10} {'s/step':>8} {'user s':>8} {'kernel s':>9} {'faults':>9}  (medians per step)"
    )
    for s in ("off", "on"):
        m = med[s]
        print(f"{s:>10} {m['step_s']:8.3f} {m['user_s']:8.3f} {m['sys_s']:9.3f} {m['faults']:9.0f}")
    cpu = {s: med[s]["user_s"] + med[s]["sys_s"] for s in med}
    print(
        f"\nwall time off/on: {med['off']['step_s'] / med['on']['step_s']:.2f}x; CPU time off/on: {cpu['off'] / cpu['on']:.2f}x"
    )


if __name__ == "__main__":
    main()
