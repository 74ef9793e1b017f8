"""A compiled per-row top-k over CSR rows: the inner loop of cell sentences.

Each row's positive entries get the 64-bit sort key of ``cellduality.sentences`` (float32 bits of the
value in the high word, the seeded tie key of the gene in the low word), a quickselect moves the k
largest to the end of a per-thread buffer, and numpy sorts only those k (its vectorised sort); a long
row is first cut by a sampled value threshold, so that only a few more than k entries get a key at all. Nothing is padded to the
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
_EXPONENT = np.uint32(0x7F800000)  # all ones: an infinity or a NaN
_MAGNITUDE = np.uint32(0x7FFFFFFF)  # all but the sign

#: what :func:`top_keys_csr` saw, as bits of the number it returns
REPEATS = 1  # a row stores a gene twice, or its genes out of order (not scipy's canonical format)
NOT_FINITE = 2  # a NaN or an infinite value
NEGATIVE = 4  # a value below zero


@numba.njit(nogil=True, cache=True)
def _select_largest(keys: np.ndarray, m: int, k: int) -> None:
    """Reorder ``keys[:m]`` in place so that ``keys[m-k:m]`` hold its k largest values (quickselect;
    keys are distinct, which every row's keys are: one per gene).

    Each partition is a branch-free Lomuto pass (every element is swapped, the boundary advances by
    the comparison's result): on random keys a branching partition mispredicts half its comparisons,
    which cost three times the work. A median of three distinct keys has one key below it, and itself
    at or above, so both sides shrink every pass; the last 16 are put in order by insertion.
    """
    lo, hi, target = 0, m, m - k
    while hi - lo > 16:
        mid = (lo + hi) // 2
        a, b, c = keys[lo], keys[mid], keys[hi - 1]  # median of three
        if a > b:
            a, b = b, a
        if b > c:
            b = c
        if a > b:
            b = a
        pivot = b
        i = lo
        for j in range(lo, hi):
            x = keys[j]
            keys[j] = keys[i]
            keys[i] = x
            i += x < pivot
        if target < i:
            hi = i
        else:
            lo = i
    for i in range(lo + 1, hi):
        x = keys[i]
        j = i - 1
        while j >= lo and keys[j] > x:
            keys[j + 1] = keys[j]
            j -= 1
        keys[j + 1] = x


@numba.njit(nogil=True, cache=True)
def _sort_small(values: np.ndarray) -> None:
    """Insertion sort, in place (the 64 sampled values: cheaper than a compiled quicksort call)."""
    for i in range(1, values.size):
        x = values[i]
        j = i - 1
        while j >= 0 and values[j] > x:
            values[j + 1] = values[j]
            j -= 1
        values[j + 1] = x


#: rows with more non-zeros than this many times k (and at least SAMPLE_MIN) are cut by a sampled
#: threshold first
_SPARSE_FACTOR = 4
_SAMPLE = 64
_SAMPLE_MIN = 256


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
) -> int:
    """Per row, its k largest sort keys, in no particular order, into ``out[row]`` (0-padded), and how
    many; returns what it saw of the rows as bits: ``REPEATS`` (a row's gene indices do not strictly
    increase: a gene stored twice would get two keys, so the result must not be used; the caller sums
    the repeats and runs again), ``NOT_FINITE`` and ``NEGATIVE`` (values ``cellduality.data.loading``
    refuses or treats as scaled: the caller applies those rules). Both checks read every index and
    value in the pass over the rows, on the pool's threads, instead of scipy's serial
    ``has_canonical_format`` and a minimum and maximum over the whole matrix first (together about a
    third of the time of ``cell_sentences``). The caller sorts the keys (numpy's sort of uint64 rows is
    vectorised: a fraction of a microsecond for 200 keys, ten times less than a compiled quicksort here).

    ``bits``: the rows' float32 values viewed as uint32 (for a positive float the bit pattern orders
    like the value); a zero or negative value (sign bit set) is not expressed and gets no key.
    ``a``, ``b``: the seeded tie order ``(a * gene + b) mod 2**32``.

    A long row (a cell with thousands of expressed genes, k = 100 or 200) is first cut by value: 64
    values sampled along the row give a threshold that about k plus a margin of the row's values
    reach, one branch-free pass keeps the positions at or above it, and only those get a 64-bit key
    and go through the quickselect. Everything at the threshold value is kept, so ties
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
    repeats = 0  # pairs of consecutive gene indices in a row that do not increase
    largest = np.uint32(0)  # above _SIGN: a negative value (-0.0 is _SIGN itself)
    magnitude = np.uint32(0)  # at least _EXPONENT: an infinity or a NaN
    for r in range(n):
        # the row as views indexed from 0 by ``range(size)``: indices numba knows are not negative, so
        # it adds no wrap-around test per access and LLVM vectorises the loops (2-3x faster)
        row = bits[indptr[r] : indptr[r + 1]]
        genes = indices[indptr[r] : indptr[r + 1]]
        nnz = row.size
        for j in range(1, nnz):
            repeats += genes[j] <= genes[j - 1]
        for j in range(nnz):
            v = row[j]
            largest = max(largest, v)
            magnitude = max(magnitude, v & _MAGNITUDE)
        cut = np.uint32(1)  # every positive value
        if nnz > _SPARSE_FACTOR * k and nnz >= _SAMPLE_MIN:
            stride = nnz // _SAMPLE
            for i in range(_SAMPLE):
                v = row[i * stride]
                sample[i] = v if v < _SIGN else np.uint32(0)
            _sort_small(sample)
            share = k * _SAMPLE / nnz
            above = int(share + 2.0 * np.sqrt(share) + 2.0)
            if above < _SAMPLE and sample[_SAMPLE - 1 - above] > 1:
                cut = sample[_SAMPLE - 1 - above]
        while True:
            # cut <= v < _SIGN (a positive value at or above the cut) as one unsigned comparison
            span = np.uint32(_SIGN - cut)
            m = 0
            for j in range(nnz):
                where[m] = j
                m += np.uint32(row[j] - cut) < span
            if m >= k or cut == 1:
                break
            cut = np.uint32(1)  # the sample's threshold kept fewer than k: the whole row
        for i in range(m):
            j = where[i]
            tie = (np.uint64(genes[j]) * a + b) & _LOW32
            keys[i] = (np.uint64(row[j]) << np.uint64(32)) | tie
        start = 0
        if m > k:
            _select_largest(keys, m, k)
            start = m - k
        size = m - start
        for t in range(size):
            out[r, t] = keys[start + t]
        for t in range(size, out.shape[1]):
            out[r, t] = 0
        counts[r] = size
    return REPEATS * (repeats > 0) | NOT_FINITE * (magnitude >= _EXPONENT) | NEGATIVE * (largest > _SIGN)


@numba.njit(nogil=True, cache=True)
def genes_of_keys(keys: np.ndarray, width: int, b: np.uint64, a_inv: np.uint64, genes: np.ndarray) -> None:
    """``genes[r, t]``: the gene of row r's t-th largest key, for ``keys`` sorted ascending per row
    (read from the end; ``a_inv``: the inverse of the tie order's ``a`` modulo 2**32); -1 where the
    key is the 0 padding."""
    n, kk = keys.shape
    for r in range(n):
        for t in range(width):
            key = keys[r, kk - 1 - t]
            genes[r, t] = -1 if key == 0 else np.int64((((key & _LOW32) - b) * a_inv) & _LOW32)


@numba.njit(nogil=True, cache=True)
def count_presence(
    genes: np.ndarray, lengths: np.ndarray, top_k: int, offset: int, counts: np.ndarray, first: np.ndarray
) -> None:
    """``GenePresence.add``'s loop: for the first ``min(lengths[i], top_k)`` genes of each row i, count
    the gene and keep its earliest position ``(offset + i) * top_k + j`` (rows are cells in reading
    order). One pass, nothing allocated: the numpy version built four arrays of the block's size and a
    scatter per block (15 ms of the main thread for each 10,000 cells)."""
    width = min(genes.shape[1], top_k)
    for i in range(genes.shape[0]):
        n = min(lengths[i], width)
        for j in range(n):
            g = np.int64(genes[i, j])
            counts[g] += 1
            pos = (offset + i) * top_k + j
            if pos < first[g]:
                first[g] = pos
