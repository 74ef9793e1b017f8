"""A compiled per-row top-k over CSR rows: the inner loop of cell sentences.

Each row's positive entries get the 64-bit sort key of ``cellduality.sentences`` (float32 bits of the
value in the high word, the seeded tie key of the gene in the low word), a quickselect moves the k
largest to the end of a per-thread buffer, and only those k are sorted; a long row is first cut by a
sampled value threshold, so that only a few more than k entries get a key at all. Nothing is padded to the
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


#: rows with more non-zeros than this many times k (and at least SAMPLE_MIN) are cut by a sampled
#: threshold first
_SPARSE_FACTOR = 4
_SAMPLE = 64
_SAMPLE_MIN = 256


@numba.njit(nogil=True, cache=True)
def top_genes_csr(
    bits: np.ndarray,
    indices: np.ndarray,
    indptr: np.ndarray,
    k: int,
    a: np.uint64,
    b: np.uint64,
    a_inv: np.uint64,
    out: np.ndarray,
    counts: np.ndarray,
) -> None:
    """Per row, the genes of its k largest sort keys, largest first, into ``out[row]`` (-1 padded),
    and how many.

    ``bits``: the rows' float32 values viewed as uint32 (for a positive float the bit pattern orders
    like the value); a zero or negative value (sign bit set) is not expressed and gets no key.
    ``a``, ``b``: the seeded tie order ``(a * gene + b) mod 2**32``; ``a_inv`` the inverse of ``a``
    modulo 2**32 (the gene back from a key).

    A long row (a cell with thousands of expressed genes, k = 100 or 200) is first cut by value: 64
    values sampled along the row give a threshold that about k plus a margin of the row's values
    reach, one branch-free pass keeps the positions at or above it, and only those get a 64-bit key
    and go through the quickselect and the sort. Everything at the threshold value is kept, so ties
    are decided by their keys as in a full selection; when fewer than k pass (a skewed sample), the
    row is done in full.
    """
    n = indptr.size - 1
    width = 0
    for r in range(n):
        width = max(width, indptr[r + 1] - indptr[r])
    keys = np.empty(max(width, 1), dtype=np.uint64)
    where = np.empty(max(width, 1), dtype=np.int64)
    sample = np.empty(_SAMPLE, dtype=np.uint32)
    for r in range(n):
        lo, hi = indptr[r], indptr[r + 1]
        nnz = hi - lo
        cut = np.uint32(1)  # every positive value
        if nnz > _SPARSE_FACTOR * k and nnz >= _SAMPLE_MIN:
            stride = nnz // _SAMPLE
            for i in range(_SAMPLE):
                v = bits[lo + i * stride]
                sample[i] = v if v < _SIGN else np.uint32(0)
            sample.sort()
            share = k * _SAMPLE / nnz
            above = int(share + 2.0 * np.sqrt(share) + 2.0)
            if above < _SAMPLE and sample[_SAMPLE - 1 - above] > 1:
                cut = sample[_SAMPLE - 1 - above]
        while True:
            m = 0
            for j in range(lo, hi):
                v = bits[j]
                where[m] = j
                m += (v >= cut) & (v < _SIGN)
            if m >= k or cut == 1:
                break
            cut = np.uint32(1)  # the sample's threshold kept fewer than k: the whole row
        for i in range(m):
            j = where[i]
            tie = (np.uint64(indices[j]) * a + b) & _LOW32
            keys[i] = (np.uint64(bits[j]) << np.uint64(32)) | tie
        start = 0
        if m > k:
            _select_largest(keys, m, k)
            start = m - k
        top = np.sort(keys[start:m])
        size = m - start
        for t in range(size):
            tie = top[size - 1 - t] & _LOW32
            out[r, t] = np.int64(((tie - b) * a_inv) & _LOW32)
        for t in range(size, out.shape[1]):
            out[r, t] = -1
        counts[r] = size
