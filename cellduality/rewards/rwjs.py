"""Rank-weighted Jaccard similarity (RWJS), the similarity every generation reward is built on.

Contract (docs/contracts.md): weight ``w(g, x) = 1 / rank(g, x)`` (ranks from 1) when ``g`` is in ``x``, else 0;
``RWJS(a, b) = sum_g min(w(g,a), w(g,b)) / sum_g max(w(g,a), w(g,b))`` over the union of genes.
Top-ranked genes dominate, so getting the most expressed genes right matters most, as it should for a
cell sentence. A repeated gene counts once, at its first position, and the genes after it move up
(ranks are positions in the de-duplicated list), matching the contract's cleaning of generated lists.
"""

from __future__ import annotations

from collections.abc import Sequence


def _weights(genes: Sequence[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for gene in genes:
        if gene not in weights:
            weights[gene] = 1.0 / (len(weights) + 1)
    return weights


def rwjs(reference: Sequence[str], generated: Sequence[str]) -> float:
    """RWJS between an ordered reference list and an ordered generated list, in [0, 1].

    1 for identical lists, 0 for disjoint lists and 0 when ``generated`` is empty.
    """
    wa = _weights(reference)
    wb = _weights(generated)
    if not wa or not wb:
        return 0.0
    num = 0.0
    den = 0.0
    # a fixed order (not a set) so the floating-point sum is the same in every process
    for gene in dict.fromkeys([*wa, *wb]):
        x = wa.get(gene, 0.0)
        y = wb.get(gene, 0.0)
        num += min(x, y)
        den += max(x, y)
    return num / den if den > 0 else 0.0
