"""``torch.multinomial``'s own draws on the CPU, with its exponential variates made in bulk.

Why: transformers picks each sampled token with ``torch.multinomial(probs, 1)``. For one sample torch
uses the exponential trick, ``argmax(probs / q)`` with ``q = empty_like(probs).exponential_()``, and on
the CPU ``exponential_`` makes each variate in a serial loop: two 32-bit Mersenne-Twister outputs, a
53-bit uniform ``u``, then the C library's ``-log1p(-u)`` in double precision, rounded to the tensor's
float. In the demo's dual GRPO (32 rows, a 4,029-word vocabulary) that loop took 2.1-2.3 ms a token,
38% of a rollout's generation (profiled with torch.profiler: 90 of 238 ms).

Here the same variates come from the same generator in bulk: ``random_()`` on an int64 tensor of the
same shape consumes exactly the same two outputs per element (``random64()``, kept modulo 2^63, whose
low 53 bits are the uniform's), so the generator ends in the same state; ``u`` is then exact, and a
vectorised ``log1p`` (numpy's) gives each double within a few units in the last place of the C
library's. Rounded to float32 that is the same float except when the double lies next to the midpoint
between two floats: those few entries (about one in 10^6) are made again with ``math.log1p``, the C
library's function that torch's loop calls. ``probs / q`` and the first ``argmax`` are torch's. So every
drawn token and the generator's state afterwards are torch's, bit for bit
(``tests/test_draws.py`` compares them over millions of variates); only the time differs.

Scope: a CPU float32 2-D ``probs``, one sample per row, no ``out=``; everything else, and inputs torch
rejects (non-finite, negative or all-zero rows, checked before any variate is drawn, as torch does),
goes to ``torch.multinomial`` itself, with its messages. :func:`torch_draws` installs it while its
``with`` block runs: GRPO's ``train`` with ``cpu_sampler: torch`` (the default; the opt-in inverse-CDF
sampler, ``cellduality.train.sampling``, draws other tokens and is used instead) and the sampled
generations of ``cellduality.inference`` (eval, predict). ``CELLDUALITY_FAST_DRAWS=0`` turns it off.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

_TORCH_MULTINOMIAL = torch.multinomial
#: rows this process drew a token for through :func:`exact_multinomial`'s own path (tests check that
#: training takes it)
rows_drawn = 0
_lock = threading.Lock()
#: low 53 bits: the uniform's mantissa (``transformation::uniform_real<double>``)
_MASK53 = (1 << 53) - 1
#: a double's last 29 mantissa bits decide its rounding to float32; 2^28 is the midpoint between floats
_LOW29 = (1 << 29) - 1
_MIDPOINT = 1 << 28
#: how far (in units of the double's last place) a vectorised log1p may be from the C library's and
#: still round to the same float32 without a second look: far above any implementation's error
_MARGIN = 1 << 10


def exponential_variates(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    """``torch.empty(shape).exponential_(generator=generator)`` (float32, rate 1): the same values, and
    the generator left in the same state."""
    bits = torch.empty(shape, dtype=torch.int64).random_(generator=generator).numpy()
    return torch.from_numpy(_variates_from_bits(bits))


def _variates_from_bits(bits: np.ndarray) -> np.ndarray:
    """float32 ``-log1p(-u)`` for ``u`` the low 53 bits of each of ``bits`` times 2^-53, rounded as the C
    library's double would round (``bits`` is overwritten)."""
    np.bitwise_and(bits, _MASK53, out=bits)
    e = bits.astype(np.float64)
    e *= 2.0**-53  # u, exactly: an integer below 2^53 times a power of two
    np.negative(e, out=e)
    np.log1p(e, out=e)
    np.negative(e, out=e)  # torch: (-1.0 / lambda) * log1p(-u), lambda = 1
    q = e.astype(np.float32)
    low = e.view(np.int64) & _LOW29
    low -= _MIDPOINT - _MARGIN
    near = low.view(np.uint64) <= 2 * _MARGIN  # within the margin of a midpoint
    if near.any():
        flat, u = q.reshape(-1), bits.reshape(-1)
        for i in np.flatnonzero(near).tolist():
            flat[i] = np.float32(-math.log1p(-(int(u[i]) * 2.0**-53)))
    return q


def one_cpu_sample(input: torch.Tensor, num_samples: int, out: torch.Tensor | None) -> bool:
    """Whether a ``torch.multinomial`` call is one sample from each row of a CPU floating-point
    ``(rows, categories)`` tensor, without ``out=``: the calls this module's and
    ``cellduality.train.sampling``'s replacements answer themselves (one sample is the same with or
    without replacement); every other call goes to torch's own function."""
    return (
        out is None
        and num_samples == 1
        and input.dim() == 2
        and input.device.type == "cpu"
        and input.is_floating_point()
        and input.shape[-1] > 0
    )


def exact_multinomial(
    input: torch.Tensor,
    num_samples: int,
    replacement: bool = False,
    *,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.multinomial``, the same draws, for CPU float32 ``(rows, categories)`` input and one sample
    (torch's fast path: ``argmax(input / Exponential(1))``); every other call is torch's own."""
    if not one_cpu_sample(input, num_samples, out) or input.dtype != torch.float32 or input.requires_grad:
        return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator, out=out)
    # torch's checks, before any variate: it raises for these (and draws nothing)
    valid = bool(((input.max() < math.inf) & (input.min() >= 0)).item()) and not bool(
        (input.sum(1) == 0).any()
    )
    if not valid:
        return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator)
    global rows_drawn
    rows_drawn += input.shape[0]
    q = exponential_variates(tuple(input.shape), generator)
    torch.div(input, q, out=q)
    return q.argmax(dim=-1, keepdim=True)


@contextmanager
def multinomial_replaced(replacement: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``torch.multinomial`` is ``replacement``; on leaving (an error included),
    whatever was installed before is put back, so blocks nest. Process-wide while active: transformers
    looks ``torch.multinomial`` up at each call."""
    with _lock:
        previous = torch.multinomial
        torch.multinomial = replacement  # type: ignore[assignment]
    try:
        yield
    finally:
        with _lock:
            torch.multinomial = previous  # type: ignore[assignment]


@contextmanager
def torch_draws(enabled: bool | None = None) -> Iterator[None]:
    """Inside the block, ``torch.multinomial`` is :func:`exact_multinomial` (``enabled=None`` reads
    ``CELLDUALITY_FAST_DRAWS``, on unless ``0``; ``False``: a block that changes nothing)."""
    if enabled is None:
        enabled = os.environ.get("CELLDUALITY_FAST_DRAWS", "1") != "0"
    if not enabled:
        yield
        return
    with multinomial_replaced(exact_multinomial):
        yield


__all__ = [
    "exact_multinomial",
    "exponential_variates",
    "multinomial_replaced",
    "one_cpu_sample",
    "torch_draws",
]
