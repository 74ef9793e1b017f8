"""Embedded real datasets, loadable by name without a network.

Each entry knows its columns, so ``cellduality prepare --dataset norman_devel`` needs no flags. The
files and their licences are in ``resources/`` (see ``resources/SOURCES.md``); ``pbmc68k`` ships
inside the scanpy wheel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anndata as ad

from cellduality.data.loading import CellData, DataError, prepare_anndata, read_h5ad
from cellduality.data.schema import Columns


@dataclass(frozen=True)
class EmbeddedDataset:
    """A named real dataset: how to read it and which obs columns feed which task."""

    name: str
    description: str
    read: Callable[[], ad.AnnData]
    columns: Columns
    allow_scaled: bool = False
    citation: str = ""


def resource_path(filename: str) -> Path:
    """Filesystem path of a packaged resource file."""
    return Path(str(resources.files("cellduality.data").joinpath("resources", filename)))


def _pbmc68k() -> ad.AnnData:
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def _norman2019_k562() -> ad.AnnData:
    adata = read_h5ad(resource_path("norman_devel.h5ad"))
    return adata[adata.obs["dataset"].astype(str) == "norman19"].copy()


def _glioblastoma() -> ad.AnnData:
    adata = read_h5ad(resource_path("glioblastoma_panobinostat.h5ad"))
    # The condition column says ctrl/panobinostat; the dose lives in the free-text treatment column.
    adata.obs["dose"] = ["0.2 uM" if c == "panobinostat" else "" for c in adata.obs["condition"]]
    return adata


#: norman_devel's columns (and its K562 part's): the perturbation, its modality, the cell line as context
NORMAN_COLUMNS = Columns(
    perturbation="perturbation",
    control_value="control",
    perturbation_kind="genetic",
    direction="perturbation_type",
    direction_map={"CRISPRa": "overexpression (CRISPRa)", "CRISPRi": "knockdown (CRISPRi)"},
    context=("cell_type",),
)

EMBEDDED: dict[str, EmbeddedDataset] = {
    "pbmc68k": EmbeddedDataset(
        name="pbmc68k",
        description="700 PBMCs, 10 FACS-sorted immune types (scanpy's pbmc68k_reduced; ranks from .raw)",
        read=_pbmc68k,
        columns=Columns(cell_type="bulk_labels"),
        citation="Zheng et al. 2017, Nature Communications (10x Genomics 68k PBMCs)",
    ),
    "norman_devel": EmbeddedDataset(
        name="norman_devel",
        description=(
            "5,961 cells x 500 HVGs: CRISPRa in K562 (Norman 2019) and CRISPRi in three glioblastoma "
            "lines (McFaline-Figueroa 2023); genetic perturbations with controls"
        ),
        read=lambda: read_h5ad(resource_path("norman_devel.h5ad")),
        columns=NORMAN_COLUMNS,
        citation="Norman et al. 2019, Science; McFaline-Figueroa et al. 2023, Cell Genomics",
    ),
    # Norman 2019's K562 CRISPRa cells alone. On norman_devel's McFaline-Figueroa CRISPRi cells (A172,
    # T98G, U87MG) a reader fitted on the training labels names the knocked-down target from a cell at
    # chance, so no dual can score an answer there; on these K562 cells it does, weakly (0.283 vs 0.100
    # with 400 training cells, 0.425 vs 0.150 with 2,000). docs/contracts.md ("Perturbation") has it.
    "norman2019_k562": EmbeddedDataset(
        name="norman2019_k562",
        description=(
            "3,375 K562 cells x 500 HVGs: CRISPRa single and double perturbations (Norman 2019), 33 "
            "perturbations and 100 controls (norman_devel's Norman 2019 part)"
        ),
        read=_norman2019_k562,
        columns=NORMAN_COLUMNS,
        citation="Norman et al. 2019, Science",
    ),
    "glioblastoma_panobinostat": EmbeddedDataset(
        name="glioblastoma_panobinostat",
        description="5,000 glioblastoma slice-culture cells, DMSO vs 0.2 uM panobinostat, 5 patients (raw counts)",
        read=_glioblastoma,
        columns=Columns(
            perturbation="condition",
            control_value="ctrl",
            perturbation_kind="chemical",
            dose="dose",
            context=("patient_id",),
        ),
        citation="Zhao et al. 2021, Genome Medicine (GSE148842)",
    ),
    "scad_plx4720": EmbeddedDataset(
        name="scad_plx4720",
        description=(
            "108 A375 melanoma cells, PLX4720-sensitive parental vs resistant (GSE108383). Values are "
            "per-gene z-scores, not counts: sentences rank genes by over-expression relative to the "
            "population"
        ),
        read=lambda: read_h5ad(resource_path("scad_plx4720.h5ad")),
        columns=Columns(drug="drug", response="label", context=("cell_line",)),
        allow_scaled=True,
        citation="Ho et al. 2018, Genome Research (GSE108383); SCAD (Zheng et al. 2023)",
    ),
}


def load_dataset(
    source: str | Path | ad.AnnData,
    columns: Columns | None = None,
    *,
    name: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool | None = None,
) -> CellData:
    """Load an embedded dataset by name, an ``.h5ad`` path, or an in-memory AnnData, validated.

    For embedded datasets ``columns`` defaults to the entry's own; for files it must be given.
    """
    options = {"layer": layer, "gene_symbols": gene_symbols, "allow_scaled": allow_scaled}
    if isinstance(source, str) and source in EMBEDDED:
        entry = EMBEDDED[source]
        data = prepare_anndata(
            entry.read(),
            columns or entry.columns,
            name=name or entry.name,
            layer=layer,
            gene_symbols=gene_symbols,
            allow_scaled=entry.allow_scaled if allow_scaled is None else allow_scaled,
        )
        data.source = {"embedded": source, **options}
        return data
    if isinstance(source, ad.AnnData):
        adata, default_name = source, "adata"
    else:
        path = Path(source)
        if not path.suffix == ".h5ad" and not path.exists():
            raise DataError(
                f"{source!r} is neither an embedded dataset ({', '.join(EMBEDDED)}) nor an .h5ad file"
            )
        adata, default_name = read_h5ad(path), path.stem
    if columns is None:
        raise DataError(
            "name the obs columns for your tasks (for example --cell-type-col cell_type); "
            f"the columns that exist are: {', '.join(map(str, adata.obs.columns)) or '(none)'}"
        )
    data = prepare_anndata(
        adata,
        columns,
        name=name or default_name,
        layer=layer,
        gene_symbols=gene_symbols,
        allow_scaled=bool(allow_scaled),
    )
    data.source = {"path": None if isinstance(source, ad.AnnData) else str(Path(source).resolve()), **options}
    return data
