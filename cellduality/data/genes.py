"""Gene identifiers -> symbols with offline tables, and symbol clean-up.

Cell sentences are made of gene symbols, so a file indexed by Ensembl or Entrez IDs must be mapped
first. The tables ship with the package (GENCODE v44 for Ensembl, HGNC for Entrez; see
``resources/SOURCES.md``), so this works without a network.
"""

from __future__ import annotations

import gzip
import re
from functools import cache
from importlib import resources

import numpy as np
import pandas as pd

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
_ENTREZ = re.compile(r"^\d+$")


def detect_id_type(names: pd.Index | list[str], min_fraction: float = 0.8) -> str:
    """``'ensembl'``, ``'entrez'`` or ``'symbol'`` for a list of gene identifiers."""
    sample = [str(n) for n in list(names)[:2000]]
    if not sample:
        return "symbol"
    ens = np.mean([bool(_ENSEMBL.match(s)) for s in sample])
    ent = np.mean([bool(_ENTREZ.match(s)) for s in sample])
    if ens >= min_fraction:
        return "ensembl"
    if ent >= min_fraction:
        return "entrez"
    return "symbol"


def _resource(name: str):
    return resources.files("cellduality.data").joinpath("resources", name)


@cache
def ensembl_table() -> dict[str, str]:
    """Ensembl gene ID (no version) -> symbol, GENCODE v44."""
    with _resource("ensembl_to_symbol_gencode_v44.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = pd.read_csv(fh, header=None, names=["id", "symbol"], dtype=str)
    table = table.dropna().drop_duplicates("id")
    return dict(zip(table["id"], table["symbol"], strict=True))


@cache
def entrez_table() -> dict[str, str]:
    """Entrez gene ID -> approved symbol, HGNC."""
    with _resource("entrez_to_symbol_hgnc_hg19.txt.gz").open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = pd.read_csv(fh, sep="\t", dtype=str)
    table = table.dropna()
    table.columns = ["symbol", "id"]
    table = table.drop_duplicates("id")
    return dict(zip(table["id"], table["symbol"], strict=True))


def map_to_symbols(names: list[str], id_type: str) -> list[str | None]:
    """Symbols for identifiers of ``id_type`` (``None`` where the table has no entry)."""
    if id_type == "symbol":
        return [str(n) for n in names]
    if id_type == "ensembl":
        table = ensembl_table()
        return [table.get(str(n).split(".")[0]) for n in names]
    if id_type == "entrez":
        table = entrez_table()
        return [table.get(str(n)) for n in names]
    raise ValueError(f"unknown gene id type {id_type!r}")
