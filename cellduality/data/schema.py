"""Which obs columns each task reads, with the names configurable per dataset.

The tasks need different metadata: a cell type for annotation and generation, a drug and a
sensitive/resistant label for drug sensitivity, a perturbation with a control value for perturbation
response and for knowledge-graph neighbourhood editing (genetic perturbations only). ``Columns`` names them for one dataset; ``require`` turns a missing or wrong column into an
error that lists what the file actually has, because that is the first thing a user needs to fix it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

TASKS: tuple[str, ...] = ("annotation", "generation", "drug_sensitivity", "perturbation", "neighbourhood")
#: Tasks built only when asked for by name (``--tasks neighbourhood``): not part of "every task the
#: dataset supports", so the default task mix (and the 2x2 suite's duals) stay as they were.
OPT_IN_TASKS: tuple[str, ...] = ("neighbourhood",)
PERTURBATION_KINDS = ("genetic", "chemical")
SENSITIVE, RESISTANT = "sensitive", "resistant"


class DataError(ValueError):
    """Input data that CellDuality cannot use as it is; the message says how to fix it."""


@dataclass
class Columns:
    """Names of the obs columns that carry each task's metadata (``None`` = not available).

    Perturbations: ``perturbation`` holds the condition of each cell with ``control_value`` marking
    control cells. Genetic perturbations name target genes joined by ``combo_sep`` (``A+B`` for a
    double; GEARS' ``A+ctrl`` padding is removed, see ``cellduality.data.perturbations``); ``direction``
    is a column whose values ``direction_map`` turns into words such as "knockdown (CRISPRi)", else
    ``default_direction`` is used. Chemical perturbations name a drug, with an optional ``dose`` column.
    ``context`` columns (cell line, donor) are shown in prompts and control cells are matched on them.
    """

    cell_type: str | None = None
    drug: str | None = None
    response: str | None = None
    sensitive_value: str = SENSITIVE
    resistant_value: str = RESISTANT
    perturbation: str | None = None
    control_value: str = "control"
    perturbation_kind: str = "genetic"
    direction: str | None = None
    direction_map: dict[str, str] = field(default_factory=dict)
    default_direction: str = "knockdown"
    dose: str | None = None
    context: tuple[str, ...] = ()
    combo_sep: str = "+"

    def check(self) -> None:
        """Refuse settings that would be silently ignored (raises ``DataError`` naming the flag)."""
        if self.perturbation_kind not in PERTURBATION_KINDS:
            raise DataError(
                f"perturbation kind must be one of {', '.join(PERTURBATION_KINDS)}, got {self.perturbation_kind!r}"
            )
        if self.perturbation_kind == "chemical" and self.direction:
            raise DataError(
                f"--direction-col {self.direction!r} describes genetic perturbations (CRISPRi/CRISPRa), but "
                "the perturbation kind is chemical: drop --direction-col, or pass --perturbation-kind genetic"
            )
        if self.perturbation_kind == "genetic" and self.dose:
            raise DataError(
                f"--dose-col {self.dose!r} describes drug treatments, but the perturbation kind is genetic: "
                "drop --dose-col, or pass --perturbation-kind chemical"
            )
        if not self.combo_sep or self.combo_sep.strip() != self.combo_sep:
            raise DataError(
                f"--combo-sep must be a non-blank separator such as + or _, got {self.combo_sep!r}"
            )
        if self.perturbation and str(self.control_value).strip() == "":
            raise DataError(
                "--control-value must name the value that marks control cells, got an empty value"
            )
        if self.response and str(self.sensitive_value) == str(self.resistant_value):
            raise DataError(
                f"--sensitive-value and --resistant-value are both {self.sensitive_value!r}: they must differ"
            )

    def supported_tasks(self, include_opt_in: bool = False) -> list[str]:
        """Tasks whose required columns are named (with ``include_opt_in``, also the opt-in tasks)."""
        tasks = []
        if self.cell_type:
            tasks += ["annotation", "generation"]
        if self.drug and self.response:
            tasks.append("drug_sensitivity")
        if self.perturbation:
            tasks.append("perturbation")
            if include_opt_in and self.perturbation_kind == "genetic":
                tasks.append("neighbourhood")
        return tasks

    def required_for(self, task: str) -> list[str]:
        """Column names ``task`` reads (besides optional context, dose and direction)."""
        if task not in TASKS:
            raise DataError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        needed = {
            "annotation": [self.cell_type],
            "generation": [self.cell_type],
            "drug_sensitivity": [self.drug, self.response],
            "perturbation": [self.perturbation],
            "neighbourhood": [self.perturbation],
        }[task]
        if any(c is None for c in needed):
            flag = {
                "annotation": "--cell-type-col",
                "generation": "--cell-type-col",
                "drug_sensitivity": "--drug-col and --response-col",
                "perturbation": "--perturbation-col",
                "neighbourhood": "--perturbation-col",
            }[task]
            raise DataError(f"task {task!r} needs its column(s) named: pass {flag}")
        return [c for c in needed if c is not None]

    def optional_columns(self) -> list[str]:
        return [c for c in (self.direction, self.dose, *self.context) if c]

    def require(self, task: str, available: Iterable[str]) -> None:
        """Raise a ``DataError`` naming the existing columns if ``task`` cannot be built."""
        have = list(available)
        for column in [*self.required_for(task), *self.optional_columns()]:
            if column not in have:
                raise DataError(
                    f"column {column!r} (needed for task {task!r}) is not in adata.obs; "
                    f"the columns that exist are: {', '.join(map(str, have)) or '(none)'}"
                )
        self.check()
        if task == "neighbourhood" and self.perturbation_kind != "genetic":
            raise DataError(
                "task 'neighbourhood' edits a gene-gene knowledge-graph neighbourhood: it needs genetic "
                f"perturbations (target genes), not {self.perturbation_kind!r} ones"
            )
