"""What every reward is built from: one context, one factory signature.

A recipe names its rewards (``reward_funcs``); the training module builds ONE :class:`RewardContext` for
the run and :func:`cellduality.rewards.registry.build_rewards` calls every named factory the same way,
``factory(context, **params)``. The context holds all a reward may need, already in memory:

* ``vocabulary`` (the run's genes, case-folded symbol -> symbol) and ``vocabularies`` (each dataset's own:
  a row is parsed with its dataset's genes, as eval parses it);
* ``prepared``: the run's prepared data as the trainer loaded it (rows, meta, side tables), for the
  rewards that read ground truth. Never saved and read back, and without the test split (a reward never
  sees a test cell);
* ``generate`` and ``readers``: the policy's generation, and per task another reader (the frozen checkpoint
  of ``dual_frozen_tasks``), for the dual reward;
* ``seed``.

Labels reach only the rewards that declare them: ``build_rewards`` hands a reward outside ``USES_LABELS``
the context :meth:`RewardContext.without_labels` (no ``prepared``), and a self-supervised run builds its
context without ``prepared`` at all. The real expression of a dataset's cells (``oracle_eval``, the
verifiers) is read once per run from the dataset ``prepare`` recorded, and shared by every reward built
from the context (:meth:`RewardContext.real_data`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from cellduality.tasks.build import PreparedTasks
    from cellduality.tasks.real_data import RealData

Messages = list[dict[str, str]]
GenerateFn = Callable[[list[Messages]], list[str]]
T = TypeVar("T")

#: splits no reward may read: ``RewardContext.for_data`` leaves them out of the context
HELD_OUT_SPLITS = ("test",)


class _Shared:
    """What the rewards of one context compute once and share (the real data, the verifiers' truth)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.values: dict[tuple[Any, ...], Any] = {}


@dataclass(frozen=True)
class RewardContext:
    """Everything a reward factory may read (module docstring); build one per training run."""

    vocabulary: Mapping[str, str] | None = None
    vocabularies: Mapping[str, Mapping[str, str]] | None = None
    prepared: PreparedTasks | None = None
    generate: GenerateFn | None = None
    readers: Mapping[str, GenerateFn] = field(default_factory=dict)
    seed: int = 0
    _shared: _Shared = field(default_factory=_Shared, repr=False, compare=False)

    @classmethod
    def for_data(cls, prepared: PreparedTasks, *, labelled: bool = True, **fields: Any) -> RewardContext:
        """A run's context: vocabularies from the prepared metadata, and the prepared data themselves (the
        same objects, less :data:`HELD_OUT_SPLITS`) only when ``labelled`` (a self-supervised run passes
        ``labelled=False``: no label in its context)."""
        from datasets import DatasetDict

        from cellduality.parsing import gene_vocabulary

        meta = prepared.meta
        parts = meta.get("parts") or {meta.get("dataset", ""): meta}
        seen = DatasetDict({k: v for k, v in prepared.datasets.items() if k not in HELD_OUT_SPLITS})
        return cls(
            vocabulary=gene_vocabulary(prepared.genes),
            vocabularies={str(name): gene_vocabulary(m.get("genes", [])) for name, m in parts.items()},
            prepared=replace(prepared, datasets=seen) if labelled else None,
            **fields,
        )

    def without_labels(self) -> RewardContext:
        """The same context without the prepared data, and with nothing computed from them (the shared
        values hold real cells and their labels): what a label-free reward is built from."""
        return replace(self, prepared=None, _shared=_Shared())

    def require_prepared(self, reward: str) -> PreparedTasks:
        """The prepared data, or an error saying that ``reward`` reads them and the context has none."""
        if self.prepared is None:
            raise ValueError(
                f"{reward} reads ground truth from the run's prepared data, and this context has none: "
                "build the context with RewardContext.for_data(prepared) (a self-supervised run has none)"
            )
        return self.prepared

    def shared(self, key: tuple[Any, ...], build: Callable[[], T]) -> T:
        """``build()`` once per ``key`` for all the rewards of this context (the four verifiers share one
        ground truth); later calls return the same object."""
        with self._shared.lock:
            if key not in self._shared.values:
                self._shared.values[key] = build()
            return self._shared.values[key]

    def real_data(self, dataset: str) -> RealData:
        """The real expression of ``dataset``'s cells, read once from what ``prepare`` recorded (the
        embedded dataset by name, or the ``.h5ad`` path of ``meta['source']``)."""
        from cellduality.tasks.build import part_meta
        from cellduality.tasks.real_data import load_real_data

        prepared = self.require_prepared("the real expression data")

        def load() -> RealData:
            meta = part_meta(prepared.meta, dataset)
            return load_real_data(meta)  # the path, layer and gene-symbol column prepare recorded

        return self.shared(("real_data", dataset), load)


__all__ = ["HELD_OUT_SPLITS", "GenerateFn", "Messages", "RewardContext"]
