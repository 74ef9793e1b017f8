"""Data layer: read, validate, normalise, map gene IDs, split; embedded real datasets by name."""

from cellduality.data.embedded import EMBEDDED, load_dataset
from cellduality.data.loading import CellData, prepare_anndata, read_h5ad
from cellduality.data.schema import TASKS, Columns, DataError
from cellduality.data.splits import Split, split_cells

__all__ = [
    "EMBEDDED",
    "TASKS",
    "CellData",
    "Columns",
    "DataError",
    "Split",
    "load_dataset",
    "prepare_anndata",
    "read_h5ad",
    "split_cells",
]
