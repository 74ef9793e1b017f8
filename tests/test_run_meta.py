"""The checkpoint contract: run metadata is written one way and found by one rule, for every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellduality.data.schema import DataError
from cellduality.modeling.checkpoint import RUN_META, read_run_meta, run_meta_path, write_run_meta
from cellduality.predict.checkpoint import find_run_meta

META = {"dataset": "toy", "sentences": {"top_k": 16, "n_genes": 8}, "tasks": ["annotation"]}


def test_one_rule_for_every_reader(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run_meta(run, META, {"stage": "sft"})
    written = json.loads((run / RUN_META).read_text())
    assert written == {"prepared": META, "sentences": {"toy": {"top_k": 16, "n_genes": 8}}, "stage": "sft"}
    other = run / "copy"  # a folder inside the run that is no checkpoint of it
    for folder in (run / "checkpoint-3", run / "merged", other):
        folder.mkdir()
    for folder, found in (
        (run, run / RUN_META),
        (run / "checkpoint-3", run / RUN_META),
        (run / "merged", run / RUN_META),
        (other, None),
        (tmp_path / "nowhere", None),
        (None, None),
    ):
        assert run_meta_path(folder) == found, folder
        assert read_run_meta(folder) == (written if found else None)
    # prediction finds what the others find, and refuses where they find nothing
    assert find_run_meta(run / "checkpoint-3") == run / RUN_META
    with pytest.raises(DataError, match="no run metadata"):
        find_run_meta(other)


def test_unreadable_run_meta_is_none_for_readers_and_refused_by_predict(tmp_path: Path) -> None:
    from cellduality.predict.checkpoint import Checkpoint

    (tmp_path / RUN_META).write_text("{not json")
    assert run_meta_path(tmp_path) == tmp_path / RUN_META
    assert read_run_meta(tmp_path) is None
    with pytest.raises(DataError, match="not readable run metadata"):
        Checkpoint.load(tmp_path)
