"""Completion parsing now lives in :mod:`cellduality.parsing` (below ``tasks`` and ``rewards``, which both
use it); this name is kept so existing imports work."""

from cellduality.parsing import *  # noqa: F403
from cellduality.parsing import (  # noqa: F401
    ParsedCompletion,
    clean_genes,
    completion_text,
    gene_vocabulary,
    match_label,
    normalize_label,
    parse_completion,
    parse_genes,
    parse_label,
)
