"""On the CPU, drawing a token costs one uniform per row, not one exponential per vocabulary entry.

Why: transformers picks each sampled token with ``torch.multinomial(probs, 1)``. On the CPU torch draws
it by the exponential trick (``argmax(probs / Exponential(1))``), one exponential variate per entry of
the vocabulary, and those variates are slow to make: in the demo's dual GRPO (32 rows, a 4,029-word
vocabulary) a call took 2.1-2.4 ms, 38% of a rollout's generation and 12% of a whole GRPO step
(``benchmarks/train_speed.py``). Inverse-CDF sampling draws from the *same* categorical distribution
with one uniform variate per row: a cumulative sum and a binary search, about 0.1 ms.

The samples differ from torch's (another use of the random stream), so a run's rollouts differ from one
made with ``torch.multinomial``: the same distribution, other draws. That is why it is opt-in
(``cpu_sampler: inverse_cdf`` in a GRPO recipe): with it, every documented GRPO figure of a seed would
be another draw. Over six seeds of the demo's dual GRPO from one SFT checkpoint, the test metrics with
either sampler agree within the seeds' spread, but perturbation's dual check found signal in 5 of 6
torch checkpoints and 2 of 6 inverse-CDF ones, which six seeds do not settle (docs/results.md, "Speed
and results").

Scope: :func:`inverse_cdf_sampling` replaces ``torch.multinomial`` only while its ``with`` block runs
(the trainer's ``train``), and only for the calls it can answer exactly: a CPU floating-point 2-D
``probs``, one sample per row, no ``out=``. Every other call (CUDA tensors, several samples, 1-D input)
goes to torch's own function, as do inputs torch would reject (negative, non-finite or all-zero rows),
so its error messages are unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from cellduality.modeling.draws import multinomial_replaced, one_cpu_sample

_TORCH_MULTINOMIAL = torch.multinomial


def inverse_cdf_multinomial(
    input: torch.Tensor,
    num_samples: int,
    replacement: bool = False,
    *,
    generator: torch.Generator | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.multinomial`` with one uniform per row for CPU ``(rows, categories)`` input and one sample.

    One sample is the same with or without replacement. A row's weights need not sum to one (as for
    torch). A category of weight zero is never drawn: the search finds the first cumulative sum above
    ``u * total``, which a zero weight never is, and the rare ``u * total == total`` rounding is
    clamped to the row's last category of positive weight.
    """
    if not one_cpu_sample(input, num_samples, out):
        return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator, out=out)
    cdf = input.cumsum(-1, dtype=torch.float64)
    total = cdf[:, -1:].contiguous()
    if not (bool(torch.isfinite(total).all()) and bool((total > 0).all()) and bool((input >= 0).all())):
        # torch's own function raises its own error for these rows
        return _TORCH_MULTINOMIAL(input, num_samples, replacement, generator=generator)
    u = torch.rand(total.shape, dtype=torch.float64, generator=generator) * total
    drawn = torch.searchsorted(cdf, u, right=True)
    last_positive = torch.searchsorted(cdf, total)  # the category whose weight reaches the total
    return torch.minimum(drawn, last_positive)


@contextmanager
def inverse_cdf_sampling(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``torch.multinomial`` is :func:`inverse_cdf_multinomial` (``enabled=False``: a
    block that changes nothing); leaving it puts back what was there (``multinomial_replaced``, shared
    with ``cellduality.modeling.draws``), so nested blocks are fine."""
    if not enabled:
        yield
        return
    with multinomial_replaced(inverse_cdf_multinomial):
        yield


__all__ = ["inverse_cdf_multinomial", "inverse_cdf_sampling"]
