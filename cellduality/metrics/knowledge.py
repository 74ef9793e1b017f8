"""Prior biological knowledge shipped with the package: PROGENy pathway weights and GO BP annotations.

They feed pathway-activity agreement (does a predicted perturbation move the same signalling pathways
as the real one? :mod:`cellduality.metrics.pathways`), the GO graph-neighbour perturbation baseline and
the neighbourhood task's graph (:mod:`cellduality.metrics.baselines`). They sit on the metrics floor, below
the tasks, because reading a file the package ships is no I/O of the user's data. The
files live in ``cellduality/knowledge/`` (provenance and licences in its ``SOURCES.md``) and are read
with ``importlib.resources``, so they work from a wheel, a zip or a source checkout, offline. Each file
is parsed once per process (``functools.lru_cache``); the loaders hand out copies or read-only views so
that a caller cannot corrupt the cache.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Mapping
from functools import lru_cache
from importlib.resources import files
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

GO_BP_ROOT = "GO:0008150"
"""The Biological Process root term: every gene 'shares' it, so it carries no information."""

_PACKAGE = "cellduality"
_FOLDER = "knowledge"


def _read_bytes(name: str) -> bytes:
    return files(_PACKAGE).joinpath(_FOLDER, name).read_bytes()


def _read_gzip_lines(name: str) -> list[str]:
    text = gzip.decompress(_read_bytes(name)).decode("utf-8")
    return [line for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=1)
def _progeny_long() -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(io.BytesIO(_read_bytes("progeny_human_top100.csv")))


def load_progeny(organism: str = "human", top: int = 100) -> pd.DataFrame:
    """PROGENy weights as a genes x pathways DataFrame (0 where a gene is not in a pathway's top list).

    ``top`` keeps, per pathway, the genes whose p-value rank is at most ``top`` (ties kept, as
    ``progeny::getModel`` does); only the human top-100 model is shipped, so ``top`` must be <= 100.
    Returns a fresh copy each call (the parsed file itself is cached).
    """
    if organism.lower() != "human":
        raise ValueError(f"only the human PROGENy model is shipped, not {organism!r}")
    if not 1 <= top <= 100:
        raise ValueError(f"top must be between 1 and 100 (the shipped model is top 100), got {top}")
    long = _progeny_long()
    if top < 100:
        rank = long.groupby("pathway")["p_value"].rank(method="min")
        long = long[rank <= top]
    wide = long.pivot_table(index="gene", columns="pathway", values="weight", aggfunc="first", fill_value=0.0)
    wide.columns.name = None
    wide.index.name = "gene"
    return wide.astype(float).copy()


@lru_cache(maxsize=2)
def _go_bp(drop_root: bool) -> Mapping[str, frozenset[str]]:
    table: dict[str, frozenset[str]] = {}
    for line in _read_gzip_lines("go_bp_human.tsv.gz"):
        symbol, _, terms = line.partition("\t")
        ids = {t for t in terms.split(";") if t}
        if drop_root:
            ids.discard(GO_BP_ROOT)
        table[symbol] = frozenset(ids)
    return MappingProxyType(table)


def load_go_bp(drop_root: bool = True) -> Mapping[str, frozenset[str]]:
    """Human gene symbol -> set of directly annotated GO Biological Process term IDs (read-only view).

    The root ``GO:0008150`` is dropped by default: 195 genes carry only it (evidence ND, "no biological
    data available"), and keeping it would make every gene a neighbour of every other. Genes left with
    no term map to an empty set. Symbols are spelled as in org.Hs.eg.db (e.g. ``C1orf112``): compare
    case-insensitively.
    """
    return _go_bp(drop_root)


@lru_cache(maxsize=1)
def load_go_term_names() -> Mapping[str, str]:
    """GO BP term ID -> term name (read-only view), for reports that explain a GO neighbourhood."""
    names: dict[str, str] = {}
    for line in _read_gzip_lines("go_terms_bp.tsv.gz"):
        go_id, _, name = line.partition("\t")
        names[go_id] = name
    return MappingProxyType(names)
