"""Keep freed memory in the process heap during CPU training (glibc ``mallopt``).

Why: a training step on the CPU allocates and frees the same large activation and gradient buffers
every step. glibc serves blocks above its mmap threshold with fresh ``mmap`` pages and returns them on
``free``, so every step page-faults its buffers in again: on the demo's tiny Llama that was ~350,000
minor page faults and ~0.7 s of kernel time per SFT step (measured with ``benchmarks/cpu_allocator.py``,
which prints the ratio on the machine it runs on). Raising the mmap threshold and the trim threshold
keeps those pages mapped and reused. Peak resident memory is unchanged (the buffers are needed at the
peak anyway); memory freed after the peak is kept by the process until it exits.

Only glibc Linux has ``mallopt``; elsewhere (macOS, musl) this is a no-op. GPU training is untouched:
its large buffers live on the device. ``CELLDUALITY_KEEP_HEAP=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # glibc's maximum on 64-bit is larger; 1 GiB covers any buffer of a CPU run
_TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the heap settings once per process; True when they are in force (glibc Linux, not opted out)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CELLDUALITY_KEEP_HEAP", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
    return _applied


def keep_freed_memory_on_cpu(use_cpu: bool) -> bool:
    """:func:`keep_freed_memory` when the run trains on the CPU (``use_cpu`` or no CUDA device)."""
    if not use_cpu:
        import torch

        if torch.cuda.is_available():
            return False
    return keep_freed_memory()


__all__ = ["keep_freed_memory", "keep_freed_memory_on_cpu"]
