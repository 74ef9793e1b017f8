"""The TRL internals our vLLM dual generation reads exist in the installed TRL, and the pins say so.

``cellduality.train.generation`` reads private state of TRL's ``GRPOTrainer`` and ``VLLMGeneration``
(``TRL_PRIVATE_ATTRIBUTES``). A minor TRL release may rename one; the dual generation would then skip
a weight push or crash on a GPU only. This test reads the installed TRL's source for every attribute
and fails with one line naming what is missing, and checks that the ``trl`` pin admits only the minor
release checked here and that the ``vllm`` extra stays inside the range TRL itself declares.
"""

from __future__ import annotations

import inspect
import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from cellduality.train.generation import TRL_PRIVATE_ATTRIBUTES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _requirements(section: list[str], name: str) -> Requirement:
    (req,) = [Requirement(r) for r in section if Requirement(r).name == name]
    return req


def _assigned(cls: type, attribute: str) -> bool:
    """Whether ``cls`` defines ``attribute`` or assigns ``self.<attribute>`` anywhere in its source."""
    if hasattr(cls, attribute):
        return True
    return (
        re.search(
            rf"self\.{re.escape(attribute)}\b\s*(?:,[^=\n]*)?(?::[^=\n]+)?=(?!=)", inspect.getsource(cls)
        )
        is not None
    )


def test_trl_has_every_private_attribute_we_use() -> None:
    from trl import GRPOTrainer
    from trl.generation.vllm_generation import VLLMGeneration

    owners = {"trainer": GRPOTrainer, "vllm_generation": VLLMGeneration}
    missing = [
        f"{owners[owner].__name__}.{attr}"
        for owner, attr in TRL_PRIVATE_ATTRIBUTES
        if not _assigned(owners[owner], attr)
    ]
    assert not missing, (
        f"TRL {metadata.version('trl')} lacks {', '.join(missing)}, which cellduality.train.generation "
        "reads: adapt the vLLM dual generation before widening the trl pin in pyproject.toml"
    )


def test_trl_generate_still_does_what_the_dual_path_mirrors() -> None:
    """Our colocate path copies TRL's sequence: re-sync when the weights sleep, wake the KV cache,
    PEFT + TP barrier, sleep level 2. If TRL's generate stops doing one of these, ours must be revisited."""
    from trl.generation.vllm_generation import VLLMGeneration

    source = inspect.getsource(VLLMGeneration.generate)
    for needle in (
        "self._llm_weights_sleeping",
        "self.sync_weights()",
        'wake_up(tags=["kv_cache"])',
        "torch.distributed.barrier",
        "self.llm.sleep(level=2)",
    ):
        assert needle in source, (
            f"TRL {metadata.version('trl')}'s VLLMGeneration.generate no longer has {needle}"
        )
    assert 'wake_up(tags=["weights"])' in inspect.getsource(VLLMGeneration.sync_weights)


def test_trl_pin_names_checked_versions() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    trl = _requirements(project["dependencies"], "trl")
    installed = Version(metadata.version("trl"))
    assert installed in trl.specifier, f"installed TRL {installed} is outside the pin {trl}"
    nxt = Version(f"{installed.major}.{installed.minor + 1}.0")
    assert nxt not in trl.specifier, f"the trl pin {trl} admits {nxt}, which no test here has checked"


def test_vllm_extra_inside_trls_range() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    ours = _requirements(project["optional-dependencies"]["vllm"], "vllm")
    trls = [Requirement(r) for r in metadata.requires("trl") or [] if r.startswith("vllm")]
    (theirs,) = [r for r in trls if r.marker is not None and r.marker.evaluate({"extra": "vllm"})]
    bounds = [Version(s.version) for s in theirs.specifier]
    low, high = min(bounds), max(bounds)
    candidates = [low, high, Version("0.11.0"), Version(f"{high.major}.{high.minor + 1}.0")]
    outside = [str(v) for v in candidates if v in ours.specifier and v not in theirs.specifier]
    assert not outside, (
        f"the vllm extra ({ours.specifier}) admits {outside}, outside TRL's {theirs.specifier}"
    )
