"""Keeping freed memory in the heap: a buffer freed and allocated again is not page-faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys
import torch
from cellduality.train.allocator import keep_freed_memory
applied = keep_freed_memory()
def touch():
    # 64 MiB as torch's CPU allocator asks for it (training's activations and gradients), above glibc's
    # mmap threshold (numpy would ask for transparent huge pages, which hides the effect)
    buf = torch.empty(16 * 1024 * 1024, dtype=torch.float32)
    buf.fill_(1.0)
    return float(buf[-1])
for _ in range(8):  # glibc settles within a few rounds (measured: faults stop after the fifth)
    touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    touch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults(keep: str) -> dict:
    env = {**os.environ, "CELLDUALITY_KEEP_HEAP": keep}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc Linux only")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    off, on = _faults("0"), _faults("1")
    assert not off["applied"] and on["applied"]
    pages = 10 * 64 * 1024 * 1024 // 4096  # every page of every buffer, if each is mapped anew
    assert off["faults"] > pages // 2  # glibc maps and unmaps a fresh buffer each time
    assert on["faults"] < pages // 20  # the freed buffer is handed back from the heap
