"""The GPU check's wheel list and its figures (the check itself runs with --cpu-smoke, not in tests).

``benchmarks/gpu_check.py`` installs what a GPU machine's bare Python lacks from wheels fetched with
``benchmarks/fetch_gpu_check_wheels.sh``; the list must name the stack the tests run on, or the GPU
figures would be of another stack.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / "benchmarks" / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            package, version = line.split("==")
            pins[package.lower().replace("_", "-")] = version
    return pins


def test_wheel_lists_are_the_tested_stack() -> None:
    gc = _gpu_check()
    wanted = dict(r.split("==") for r in (*gc.REQUIREMENTS, gc.DEEPSPEED) if "==" in r)
    for name, version in wanted.items():
        assert version == metadata.version(name), (
            f"gpu_check installs {name} {version}, tests ran {metadata.version(name)}"
        )
    base = {"torch", "transformers", "accelerate", "peft", "numpy", "scipy", "pandas"}
    for listing in ("gpu_check_wheels.txt", "gpu_check_wheels_device.txt"):
        pins = _pins(listing)
        for name, version in wanted.items():
            assert pins.get(name) == version, (
                f"{listing}: {name} {pins.get(name)}, gpu_check installs {version}"
            )
        assert not base & set(pins), f"{listing}: the machine's own packages must not be replaced"


def test_figures_from_a_log_history() -> None:
    gc = _gpu_check()
    history = [
        {"step_time": 9.0, "rewards/dual/mean": 0.0, "rewards/format/mean": 0.0, "num_tokens": 100},
        {"step_time": 2.0, "rewards/dual/mean": 0.25, "rewards/format/mean": 0.0, "num_tokens": 200},
        {"step_time": 4.0, "rewards/dual/mean": 0.5, "rewards/format/mean": 0.0, "num_tokens": 300},
        {"train_runtime": 15.0},
    ]
    figures = gc.train_figures(history, 3)
    assert figures["median_step_time_s"] == 3.0  # the first (warm-up) step left out
    assert figures["tokens_per_s"] == 20.0
    assert figures["rewards"]["dual"] == {"mean": 0.25, "non_zero": True}
    assert figures["rewards"]["format"]["non_zero"] is False
    sft = gc.train_figures([{"loss": 1.0, "num_tokens": 50}, {"train_runtime": 10.0}], 5)
    assert sft["mean_step_time_s"] == 2.0 and "rewards" not in sft
