"""The draws of many examples' seeded generators at once, compiled: what ``example_rng`` gives, in bulk.

Every example draws from its own generator, ``numpy.random.default_rng([seed, crc32(key)])``
(:func:`cellduality.tasks.common.example_rng`): a SeedSequence hashes the two words into a PCG64
state, and the example's hidden genes, candidate order and template come from that stream. Building
that generator costs about 30 us of Python per example, more than everything else an example needs,
and its draws cost a few us each. This module runs the same algorithms in one compiled loop over the
examples of a chunk: numpy's SeedSequence (``bit_generator.pyx``: ``mix_entropy`` and
``generate_state``), PCG64's seeding and XSL-RR output (``pcg64.h``), and the ``Generator`` methods the
builders call, draw for draw:

* ``random(n)``: ``(next_uint64 >> 11) * 2**-53`` per value;
* ``integers(n)`` (scalar): Lemire's bounded draw on 32-bit outputs (``buffered_bounded_lemire_uint32``),
  PCG64 handing out the two halves of one 64-bit output in turn;
* ``permutation(m)``: Fisher-Yates from the end with a masked rejection draw (``random_interval``);
* ``choice(pop, size, replace=False)``: Floyd's algorithm with Lemire draws, then a Fisher-Yates of the
  picks with Lemire draws (numpy's tail-shuffle branch, ``pop > 10000`` and ``size > pop // 50``, is
  not compiled: :func:`covered` says when a caller must use the generator instead).

A program (op codes, one per draw the builder makes, in its order) runs per example with per-example
parameters. ``tests/test_tasks_columns.py`` checks every op against ``numpy.random.Generator``.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

#: op codes of a draw program
HIDE = 0  # hide_genes: informative (random(n) jitter, by score then jitter) or random (choice)
PERMUTE = 1  # permutation(m)
INTEGER = 2  # integers(n)
CHOICE = 3  # choice(pop, size, replace=False)

_U32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_S16 = np.uint64(16)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)
_MUL_HI = np.uint64(2549297995355413924)
_MUL_LO = np.uint64(4865540595714422341)
_INIT_A = np.uint64(0x43B0D7E5)
_MULT_A = np.uint64(0x931E8875)
_INIT_B = np.uint64(0x8B51F9DD)
_MULT_B = np.uint64(0x58F38DED)
_MIX_L = np.uint64(0xCA01F9DD)
_MIX_R = np.uint64(0x4973F715)
#: numpy's choice without replacement shuffles the whole population above this size (not compiled)
TAIL_SHUFFLE_POP = 10_000


@numba.njit(inline="always")
def _mul64(a: np.uint64, b: np.uint64) -> tuple[np.uint64, np.uint64]:
    """The 128-bit product of two 64-bit words as (high, low)."""
    a_lo, a_hi = a & _U32, a >> _S32
    b_lo, b_hi = b & _U32, b >> _S32
    p0, p1, p2, p3 = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (p0 >> _S32) + (p1 & _U32) + (p2 & _U32)
    return p3 + (p1 >> _S32) + (p2 >> _S32) + (mid >> _S32), (p0 & _U32) | (mid << _S32)


@numba.njit(inline="always")
def _step(st: np.ndarray) -> None:
    """PCG64's LCG step: ``state = state * MULT + inc`` modulo 2**128 (st = s_hi, s_lo, i_hi, i_lo, ...)."""
    hi, lo = _mul64(st[1], _MUL_LO)
    hi += st[0] * _MUL_LO + st[1] * _MUL_HI
    new_lo = lo + st[3]
    hi += st[2] + (_ONE if new_lo < lo else _ZERO)
    st[0], st[1] = hi, new_lo


@numba.njit(inline="always")
def _next64(st: np.ndarray) -> np.uint64:
    _step(st)
    x = st[0] ^ st[1]
    rot = st[0] >> np.uint64(58)
    return (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))


@numba.njit(inline="always")
def _next32(st: np.ndarray) -> np.uint64:
    if st[4]:
        st[4] = _ZERO
        return st[5]
    value = _next64(st)
    st[4] = _ONE
    st[5] = value >> _S32
    return value & _U32


@numba.njit(inline="always")
def _lemire(st: np.ndarray, rng: np.uint64) -> np.uint64:
    """An integer in [0, rng] (``random_bounded_uint64`` for rng < 2**32 - 1)."""
    if rng == _ZERO:
        return _ZERO
    excl = rng + _ONE
    m = _next32(st) * excl
    left = m & _U32
    if left < excl:
        threshold = (_U32 - rng) % excl
        while left < threshold:
            m = _next32(st) * excl
            left = m & _U32
    return m >> _S32


@numba.njit(inline="always")
def _interval(st: np.ndarray, top: np.uint64) -> np.uint64:
    """An integer in [0, top] by masked rejection (``random_interval``, top < 2**32)."""
    if top == _ZERO:
        return _ZERO
    mask = top
    mask |= mask >> _ONE
    mask |= mask >> np.uint64(2)
    mask |= mask >> np.uint64(4)
    mask |= mask >> np.uint64(8)
    mask |= mask >> _S16
    value = _next32(st) & mask
    while value > top:
        value = _next32(st) & mask
    return value


@numba.njit(inline="always")
def _hashmix(value: np.uint64, const: np.ndarray) -> np.uint64:
    value ^= const[0]
    const[0] = (const[0] * _MULT_A) & _U32
    value = (value * const[0]) & _U32
    return value ^ (value >> _S16)


@numba.njit(inline="always")
def _mix(x: np.uint64, y: np.uint64) -> np.uint64:
    result = (_MIX_L * x - _MIX_R * y) & _U32
    return result ^ (result >> _S16)


@numba.njit
def _seed(
    entropy: np.ndarray, st: np.ndarray, const: np.ndarray, pool: np.ndarray, words: np.ndarray
) -> None:
    """``st`` := the PCG64 of ``SeedSequence(entropy)`` (entropy: its uint32 words), no buffered half."""
    const[0] = _INIT_A
    for i in range(4):
        pool[i] = _hashmix(entropy[i] if i < entropy.size else _ZERO, const)
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = _mix(pool[dst], _hashmix(pool[src], const))
    for src in range(4, entropy.size):
        for dst in range(4):
            pool[dst] = _mix(pool[dst], _hashmix(entropy[src], const))
    hash_const = _INIT_B
    for i in range(8):
        value = pool[i % 4] ^ hash_const
        hash_const = (hash_const * _MULT_B) & _U32
        value = (value * hash_const) & _U32
        words[i] = value ^ (value >> _S16)
    init_hi, init_lo = words[0] | (words[1] << _S32), words[2] | (words[3] << _S32)
    seq_hi, seq_lo = words[4] | (words[5] << _S32), words[6] | (words[7] << _S32)
    st[2] = (seq_hi << _ONE) | (seq_lo >> np.uint64(63))
    st[3] = (seq_lo << _ONE) | _ONE
    st[0], st[1] = _ZERO, _ZERO
    _step(st)
    lo = st[1] + init_lo
    st[0] = st[0] + init_hi + (_ONE if lo < st[1] else _ZERO)
    st[1] = lo
    _step(st)
    st[4], st[5] = _ZERO, _ZERO


@numba.njit(nogil=True, cache=True)
def _run(
    head: np.ndarray,
    crcs: np.ndarray,
    program: np.ndarray,
    params: np.ndarray,
    sizes: np.ndarray,
    offsets: np.ndarray,
    out: np.ndarray,
    genes: np.ndarray,
    lengths: np.ndarray,
    scores: np.ndarray,
    n_hidden: np.ndarray,
    hidden: np.ndarray,
) -> None:
    """Per example e: seed with ``head + [crcs[e]]``, then run ``program``; op p writes its ints at
    ``out[e, offsets[p]:]``, HIDE writes ``hidden[e]`` (genes ``genes[e, :lengths[e]]``, ``scores`` per
    gene index, empty: the random rule)."""
    entropy = np.empty(head.size + 1, dtype=np.uint64)
    entropy[: head.size] = head
    st = np.zeros(6, dtype=np.uint64)
    const = np.zeros(1, dtype=np.uint64)
    pool = np.zeros(4, dtype=np.uint64)
    words = np.zeros(8, dtype=np.uint64)
    width = max(hidden.shape[1], 1)
    jitter = np.empty(width, dtype=np.float64)
    neg = np.empty(width, dtype=np.float64)
    picks = np.empty(max(out.shape[1], width, 1), dtype=np.int64)
    for e in range(crcs.size):
        entropy[head.size] = crcs[e]
        _seed(entropy, st, const, pool, words)
        for p in range(program.size):
            op, off = program[p], offsets[p]
            if op == INTEGER:
                out[e, off] = np.int64(_lemire(st, np.uint64(params[e, p] - 1)))
            elif op == PERMUTE:
                m = params[e, p]
                for i in range(m):
                    out[e, off + i] = i
                for i in range(m - 1, 0, -1):
                    j = np.int64(_interval(st, np.uint64(i)))
                    out[e, off + i], out[e, off + j] = out[e, off + j], out[e, off + i]
            elif op == CHOICE:
                _choice(st, params[e, p], sizes[e, p], picks)
                for i in range(sizes[e, p]):
                    out[e, off + i] = picks[i]
            else:  # HIDE
                n, k = lengths[e], n_hidden[e]
                hidden[e, :] = False
                if n < 2:
                    continue
                if scores.size == 0:
                    _choice(st, n, k, picks)
                    for i in range(k):
                        hidden[e, picks[i]] = True
                    continue
                for i in range(n):
                    jitter[i] = (_next64(st) >> np.uint64(11)) * (1.0 / 9007199254740992.0)
                    neg[i] = -scores[genes[e, i]]
                # np.lexsort((jitter, -scores))[:k]: the k first by score, then jitter, then position
                _smallest(neg, jitter, n, k, picks)
                for i in range(k):
                    hidden[e, picks[i]] = True


@numba.njit(inline="always")
def _before(i: np.int64, j: np.int64, neg: np.ndarray, jitter: np.ndarray) -> bool:
    """Whether position i sorts before j: by ``neg``, then ``jitter``, then position (a total order)."""
    if neg[i] != neg[j]:
        return neg[i] < neg[j]
    if jitter[i] != jitter[j]:
        return jitter[i] < jitter[j]
    return i < j


@numba.njit(inline="always")
def _sift(heap: np.ndarray, at: np.int64, k: np.int64, neg: np.ndarray, jitter: np.ndarray) -> None:
    while True:
        child = 2 * at + 1
        if child >= k:
            return
        if child + 1 < k and _before(heap[child], heap[child + 1], neg, jitter):
            child += 1
        if not _before(heap[at], heap[child], neg, jitter):
            return
        heap[at], heap[child] = heap[child], heap[at]
        at = child


@numba.njit(inline="always")
def _smallest(neg: np.ndarray, jitter: np.ndarray, n: np.int64, k: np.int64, heap: np.ndarray) -> None:
    """``heap[:k]`` := the k first positions of ``range(n)`` in :func:`_before`'s order (unordered):
    a max-heap of the k first seen so far, no sort of the rest."""
    if k <= 0:
        return
    for i in range(k):
        heap[i] = i
    for at in range(k // 2 - 1, -1, -1):
        _sift(heap, at, k, neg, jitter)
    for i in range(k, n):
        if _before(i, heap[0], neg, jitter):
            heap[0] = i
            _sift(heap, 0, k, neg, jitter)


@numba.njit(inline="always")
def _choice(st: np.ndarray, pop: np.int64, size: np.int64, picks: np.ndarray) -> None:
    """``Generator.choice(pop, size, replace=False)`` for ``pop <= TAIL_SHUFFLE_POP``: Floyd, then a
    shuffle of the picks (membership checked by a scan: sizes are small)."""
    for j in range(pop - size, pop):
        value = np.int64(_lemire(st, np.uint64(j)))
        for t in range(j - pop + size):
            if picks[t] == value:
                value = j
                break
        picks[j - pop + size] = value
    for i in range(size - 1, 0, -1):
        j = np.int64(_lemire(st, np.uint64(i)))
        picks[i], picks[j] = picks[j], picks[i]


def covered(pop: int, size: int) -> bool:
    """Whether ``choice(pop, size, replace=False)`` takes the branch compiled here (Floyd's)."""
    return not (pop > TAIL_SHUFFLE_POP and size > pop // 50)


def compile_draws() -> None:
    """Compile (or load from numba's cache) the draw loop now: forked workers then inherit it instead
    of each compiling it on its first chunk."""
    params = np.array([[3, 2, 2, 4]])
    sizes = np.array([[0, 0, 0, 2]])
    genes = np.arange(3).reshape(1, 3)
    for scores in (np.ones(3), None):
        run_program(
            0,
            ["warm-up"],
            [HIDE, PERMUTE, INTEGER, CHOICE],
            params,
            sizes,
            genes=genes,
            lengths=np.array([3]),
            scores=scores,
            n_hidden=np.array([1]),
        )


def seed_words(seed: int) -> np.ndarray:
    """The uint32 words SeedSequence makes of a non-negative int seed (``_int_to_uint32_array``)."""
    words = []
    n = int(seed)
    if n < 0:
        raise ValueError(f"seeds are non-negative, got {seed}")
    while True:
        words.append(n & 0xFFFFFFFF)
        n >>= 32
        if n == 0:
            break
    return np.asarray(words, dtype=np.uint64)


@dataclass(frozen=True)
class PrefixedKeys:
    """The keys ``prefix + suffix`` for each of ``suffixes`` (``dataset/task/split/`` and the cell ids),
    never joined: a crc32 continues from the prefix's (``zlib.crc32(suffix, crc32(prefix))`` is the
    crc32 of the whole key), so neither the strings nor the prefix's bytes are made again per example."""

    prefix: str
    suffixes: Sequence[str]

    def __len__(self) -> int:
        return len(self.suffixes)


def key_crcs(keys: Sequence[str] | PrefixedKeys) -> np.ndarray:
    """The second seed word of each example (``example_rng``'s crc32 of its key)."""
    if isinstance(keys, PrefixedKeys):
        head = zlib.crc32(keys.prefix.encode())
        crcs = (zlib.crc32(s.encode(), head) for s in keys.suffixes)
    else:
        crcs = (zlib.crc32(k.encode()) for k in keys)
    return np.fromiter(crcs, dtype=np.uint64, count=len(keys))


def run_program(
    seed: int,
    keys: Sequence[str] | PrefixedKeys,
    program: Sequence[int],
    params: np.ndarray,
    sizes: np.ndarray | None = None,
    *,
    genes: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    n_hidden: np.ndarray | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """The draws of ``example_rng(seed, key)`` for every key, making the calls ``program`` names.

    ``params[e, p]``: op p's argument for example e (INTEGER: n, PERMUTE: m, CHOICE: the population;
    ``sizes[e, p]`` its sample size). HIDE uses ``genes`` (example x position: gene indices),
    ``lengths``, ``n_hidden`` and ``scores`` (per gene index; ``None``: the random rule). Returns, per
    op, an (examples x width) int64 array (INTEGER: one column; an example's unused tail is -1), and
    the (examples x positions) hidden mask.
    """
    n = len(keys)
    program_arr = np.asarray(program, dtype=np.int64)
    params = np.asarray(params, dtype=np.int64).reshape(n, len(program))
    sizes = (
        np.zeros_like(params) if sizes is None else np.asarray(sizes, dtype=np.int64).reshape(params.shape)
    )
    widths = []
    for p, op in enumerate(program_arr.tolist()):
        column = params[:, p] if op == PERMUTE else sizes[:, p] if op == CHOICE else None
        widths.append(1 if op == INTEGER else int(column.max(initial=0)) if column is not None else 0)
    offsets = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
    out = np.full((n, int(offsets[-1])), -1, dtype=np.int64)
    if genes is None:
        genes = np.zeros((n, 0), dtype=np.int64)
    hidden = np.zeros(genes.shape, dtype=bool) if HIDE in program else np.zeros((n, 0), dtype=bool)
    crcs = key_crcs(keys)
    _run(
        seed_words(seed),
        crcs,
        program_arr,
        params,
        sizes,
        offsets[:-1].copy(),
        out,
        np.ascontiguousarray(genes),
        np.zeros(n, dtype=np.int64) if lengths is None else np.asarray(lengths, dtype=np.int64),
        np.zeros(0) if scores is None else np.asarray(scores, dtype=np.float64),
        np.zeros(n, dtype=np.int64) if n_hidden is None else np.asarray(n_hidden, dtype=np.int64),
        hidden,
    )
    for e in _uncovered(program_arr, params, sizes, lengths, n_hidden, scores is None):
        _generator_draws(
            seed,
            int(crcs[e]),
            program_arr,
            params[e],
            sizes[e],
            offsets,
            out[e],
            genes[e],
            hidden[e],
            lengths,
            scores,
            n_hidden,
            e,
        )
    return [out[:, offsets[p] : offsets[p + 1]] for p in range(len(program_arr))], hidden


def _uncovered(program, params, sizes, lengths, n_hidden, random_rule: bool) -> list[int]:
    """Examples with a draw the compiled loop does not make as numpy does (see :func:`covered`)."""
    bad = np.zeros(params.shape[0], dtype=bool)
    for p, op in enumerate(program.tolist()):
        if op == CHOICE:
            bad |= (params[:, p] > TAIL_SHUFFLE_POP) & (sizes[:, p] > params[:, p] // 50)
        elif op == HIDE and random_rule and lengths is not None and n_hidden is not None:
            lengths, n_hidden = np.asarray(lengths), np.asarray(n_hidden)
            bad |= (lengths > TAIL_SHUFFLE_POP) & (n_hidden > lengths // 50)
    return np.flatnonzero(bad).tolist()


def _generator_draws(
    seed, crc, program, params, sizes, offsets, out, genes, hidden, lengths, scores, n_hidden, e
):
    """One example's draws from numpy's own generator (the rare example :func:`_uncovered` finds)."""
    rng = np.random.default_rng([seed, crc])
    for p, op in enumerate(program.tolist()):
        off = offsets[p]
        if op == INTEGER:
            out[off] = int(rng.integers(params[p]))
        elif op == PERMUTE:
            out[off : off + params[p]] = rng.permutation(params[p])
        elif op == CHOICE:
            if sizes[p]:
                out[off : off + sizes[p]] = rng.choice(params[p], size=sizes[p], replace=False)
        else:
            n, k = int(lengths[e]), int(n_hidden[e])
            hidden[:] = False
            if n < 2:
                continue
            if scores is None:
                hidden[rng.choice(n, size=k, replace=False)] = True
            else:
                jitter = rng.random(n)
                hidden[np.lexsort((jitter, -np.asarray(scores, dtype=np.float64)[genes[:n]]))[:k]] = True
