"""A compiled per-row top-k over CSR rows: the inner loop of cell sentences.

Each row's positive entries get the 64-bit sort key of ``cellduality.sentences`` (float32 bits of the
value in the high word, the seeded tie key of the gene in the low word), a quickselect moves the k
largest to the end of a per-thread buffer, and only those k are sorted. Nothing is padded to the
longest row and nothing is allocated per row, which is where the vectorised numpy version spends its
time (a padded dense copy of every block, partitioned and then sorted). The numpy version stays the
reference (``cellduality.sentences._block_sparse_numpy``); a test checks both agree.

Compiled with numba (a dependency of scanpy) on first use, ``nogil`` so that the thread pool of
``cellduality.sentences`` runs blocks side by side.
"""

from __future__ import annotations

import numba
import numpy as np

_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN = np.uint32(0x80000000)


@numba.njit(nogil=True, cache=True)
def _select_largest(keys: np.ndarray, m: int, k: int) -> None:
    """Reorder ``keys[:m]`` in place so that ``keys[m-k:m]`` hold its k largest values (quickselect;
    keys are distinct, which every row's keys are: one per gene)."""
    lo, hi, target = 0, m - 1, m - k
    while lo < hi:
        mid = (lo + hi) // 2
        a, b, c = keys[lo], keys[mid], keys[hi]  # median of three
        if a > b:
            a, b = b, a
        if b > c:
            b = c
        if a > b:
            b = a
        pivot = b
        i, j = lo, hi
        while i <= j:
            while keys[i] < pivot:
                i += 1
            while keys[j] > pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break


@numba.njit(nogil=True, cache=True)
def top_keys_csr(
    bits: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    k: int,
    a: np.uint64,
    b: np.uint64,
    out: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Per row, its k largest sort keys, largest first, into ``out[row]`` (0-padded), and how many.

    ``bits``: the rows' float32 values viewed as uint32 (for a positive float the bit pattern orders
    like the value); a zero or negative value (sign bit set) is not expressed and gets no key.
    ``a``, ``b``: the seeded tie order ``(a * gene + b) mod 2**32``.
    """
    n = indptr.size - 1
    width = 0
    for r in range(n):
        width = max(width, indptr[r + 1] - indptr[r])
    keys = np.empty(max(width, 1), dtype=np.uint64)
    for r in range(n):
        m = 0
        for j in range(indptr[r], indptr[r + 1]):
            v = bits[j]
            if v == 0 or v >= _SIGN:
                continue
            tie = (np.uint64(indices[j]) * a + b) & _LOW32
            keys[m] = (np.uint64(v) << np.uint64(32)) | tie
            m += 1
        start = 0
        if m > k:
            _select_largest(keys, m, k)
            start = m - k
        top = np.sort(keys[start:m])
        size = m - start
        for t in range(size):
            out[r, t] = top[size - 1 - t]
        for t in range(size, out.shape[1]):
            out[r, t] = 0
        counts[r] = size
