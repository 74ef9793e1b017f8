"""What real atlas and screen files contain, and what a new user types: each case ends as a correct result
with a printed note, or as a one-line error naming the problem and the fix (exit code 2, no traceback).

Every file here is small and constructed in the test (or scanpy's real pbmc68k_reduced), so the whole
module runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellduality.cli import main
from cellduality.data import Columns, DataError, load_dataset, prepare_anndata
from cellduality.sentences import cell_sentences
from cellduality.tasks import TaskConfig, build_tasks

GENES = [f"GENE{i}" for i in range(30)]


def _counts(n: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.poisson(2.0, size=(n, len(GENES))).astype(np.float32))


def _adata(obs: dict, x=None, genes=None) -> ad.AnnData:
    frame = pd.DataFrame(obs)
    frame.index = [f"cell{i}" for i in range(len(frame))]
    x = _counts(len(frame)) if x is None else x
    return ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=genes or GENES))


def _write(tmp_path: Path, adata: ad.AnnData, name: str = "user.h5ad") -> Path:
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


# -- silent wrong data ----------------------------------------------------------------------------


def test_missing_labels_are_dropped_with_a_count(tmp_path: Path) -> None:
    labels = ["T cell", "B cell", None, "", "  ", "nan"] * 8
    prepared = build_tasks(
        prepare_anndata(_adata({"ct": labels}), Columns(cell_type="ct")), config=TaskConfig(top_k=10)
    )
    rows = [r for split in prepared.datasets.values() for r in split]
    assert {r["answer"] for r in rows if r["task"] == "annotation"} == {"T cell", "B cell"}
    assert {r["condition"] for r in rows if r["task"] == "generation"} == {"T cell", "B cell"}
    assert all(set(r["candidates"]) == {"T cell", "B cell"} for r in rows)
    assert not any("nan" in r["prompt"][-1]["content"].split() for r in rows)
    notes = " ".join(prepared.meta["notes"])
    assert "dropped 32 of 48 cells whose 'ct' is NaN or blank" in notes
    with pytest.raises(DataError, match="no cell has a value in 'ct'"):
        build_tasks(prepare_anndata(_adata({"ct": [None, ""] * 5}), Columns(cell_type="ct")))


def test_gears_style_conditions_and_combo_sep(tmp_path: Path) -> None:
    conditions = ["ctrl"] * 12 + ["GENE1+ctrl"] * 8 + ["ctrl+GENE2"] * 8 + ["GENE1+GENE2"] * 8 + [np.nan] * 4
    data = prepare_anndata(_adata({"condition": conditions}), Columns(perturbation="condition"))
    note = next(n for n in data.notes if n.startswith("perturbation column"))
    assert "2 single and 1 combined perturbations, 12 control cells ('ctrl')" in note
    assert "'ctrl' padding removed from 16 cells" in note
    prepared = build_tasks(data, config=TaskConfig(top_k=8))
    rows = [r for split in prepared.datasets.values() for r in split]
    assert {r["condition"] for r in rows} == {"GENE1", "GENE2", "GENE1+GENE2"}
    texts = {r["condition_text"] for r in rows}
    assert texts == {"knockdown of GENE1", "knockdown of GENE2", "knockdown of GENE1 and GENE2"}
    assert all("ctrl" not in c for r in rows for c in r["candidates"] if c != "control")
    assert any("dropped 4 of 40 cells whose 'condition' is NaN" in n for n in prepared.meta["notes"])

    # another convention: '_' joins targets; without --combo-sep a note says how to read it
    underscored = ["non-targeting"] * 12 + ["GENE1_GENE2"] * 8 + ["GENE3"] * 8
    cols = Columns(perturbation="p", control_value="non-targeting")
    data = prepare_anndata(_adata({"p": underscored}), cols)
    assert any("--combo-sep '_'" in n for n in data.notes)
    data = prepare_anndata(
        _adata({"p": underscored}), Columns(perturbation="p", control_value="non-targeting", combo_sep="_")
    )
    assert set(data.adata.obs["p"]) == {"non-targeting", "GENE1+GENE2", "GENE3"}


def test_cli_flags_out_of_range_are_refused(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, _adata({"ct": ["a", "b"] * 10}))
    base = ["prepare", "--dataset", str(path), "--cell-type-col", "ct", "--out", str(tmp_path / "o")]
    cases = [
        (["--n-genes", "-3"], "--n-genes"),
        (["--n-genes", "0"], "--n-genes"),
        (["--top-k", "0"], "--top-k"),
        (["--top-k", "-5"], "--top-k"),
        (["--max-examples", "0"], "--max-examples"),
        (["--hidden-fraction", "0"], "--hidden-fraction"),
        (["--hidden-fraction", "1.5"], "--hidden-fraction"),
        (["--test-fraction", "1"], "--test-fraction"),
        (["--holdout", "a"], "--split ood"),
    ]
    for extra, needle in cases:
        code, _, err = _cli(capsys, *base, *extra)
        _one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_direction_with_chemical_and_dose_with_genetic_are_refused(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, _adata({"drug": ["DMSO", "x"] * 10, "how": ["CRISPRi"] * 20}))
    base = ["prepare", "--dataset", str(path), "--perturbation-col", "drug", "--control-value", "DMSO"]
    code, _, err = _cli(
        capsys, *base, "--perturbation-kind", "chemical", "--direction-col", "how", "--out", "o"
    )
    _one_line_error(code, err, "--direction-col", "chemical")
    code, _, err = _cli(capsys, *base, "--dose-col", "how", "--out", "o")
    _one_line_error(code, err, "--dose-col", "genetic")


def test_column_flags_override_an_embedded_preset_field_by_field() -> None:
    from cellduality.cli import build_parser
    from cellduality.cli_common import columns_from_args

    args = build_parser().parse_args(
        ["prepare", "--dataset", "norman_devel", "--out", "o", "--context-cols", "dataset"]
    )
    columns, notes = columns_from_args(args)
    assert columns.context == ("dataset",)
    assert columns.direction == "perturbation_type" and columns.direction_map  # the preset is kept
    assert columns.perturbation == "perturbation" and columns.control_value == "control"
    assert notes and "preset columns kept except --context-cols" in notes[0]
    args = build_parser().parse_args(["prepare", "--dataset", "norman_devel", "--out", "o"])
    assert columns_from_args(args) == (None, [])  # no flag: the preset as it is


def test_cell_sentences_follows_the_matrix_rules() -> None:
    import scanpy as sc

    adata = sc.datasets.pbmc68k_reduced()  # .X z-scored, .raw log-normalised
    with pytest.warns(UserWarning, match=r"\.raw"):
        sentences = cell_sentences(adata, top_k=10)
    prepared = load_dataset("pbmc68k")
    assert sentences[:5] == cell_sentences(prepared.adata, top_k=10)[:5]
    scaled = adata.copy()
    scaled.raw = None
    with pytest.raises(DataError, match="allow-scaled"):
        cell_sentences(scaled, top_k=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(cell_sentences(scaled, top_k=10, allow_scaled=True)[0]) == 10


def test_binary_matrix_and_mouse_symbols_get_a_note() -> None:
    rng = np.random.default_rng(1)
    binary = sp.csr_matrix((rng.random((20, 30)) < 0.3).astype(np.float32))
    data = prepare_anndata(_adata({"ct": ["a", "b"] * 10}, x=binary), Columns(cell_type="ct"))
    assert any("every value is 0 or 1" in n for n in data.notes)
    mouse = ["Actb", "Cd74", "Gapdh", "Malat1", "Cd3e", "Cd19", "Ms4a1", "Lyz2", "Ptprc", "Nkg7"]
    mouse = [f"{g}{i // 10 or ''}" for i, g in enumerate(mouse * 3)]
    data = prepare_anndata(_adata({"ct": ["a", "b"] * 10}, genes=mouse), Columns(cell_type="ct"))
    assert any("look like mouse symbols" in n and "human-only" in n for n in data.notes)
    data = prepare_anndata(_adata({"ct": ["a", "b"] * 10}), Columns(cell_type="ct"))
    assert not any("mouse" in n for n in data.notes)


def test_symbol_column_found_automatically() -> None:
    from cellduality.data.genes import ensembl_table

    ids = list(ensembl_table())[:30]
    adata = _adata({"ct": ["a", "b"] * 10}, genes=ids)
    adata.var["feature_name"] = [ensembl_table()[i] for i in ids]  # CELLxGENE layout
    data = prepare_anndata(adata, Columns(cell_type="ct"))
    assert any("var['feature_name']" in n for n in data.notes)
    assert data.genes == list(dict.fromkeys(adata.var["feature_name"]))


# -- tracebacks that became messages --------------------------------------------------------------


def test_file_problems_are_one_line_errors(tmp_path: Path, capsys) -> None:
    one = _write(tmp_path, _adata({"ct": ["a"]}, x=_counts(1)), "one.h5ad")
    code, _, err = _cli(
        capsys, "prepare", "--dataset", str(one), "--cell-type-col", "ct", "--out", str(tmp_path / "o")
    )
    _one_line_error(code, err, "only 1 cell", "at least 2")

    ok = _write(tmp_path, _adata({"ct": ["a", "b"] * 10}), "ok.h5ad")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    code, _, err = _cli(
        capsys, "prepare", "--dataset", str(ok), "--cell-type-col", "ct", "--out", str(a_file)
    )
    _one_line_error(code, err, "existing file")
    assert a_file.read_text() == "mine"

    code, _, err = _cli(capsys, "prepare", "--dataset", str(tmp_path), "--cell-type-col", "ct", "--out", "o")
    _one_line_error(code, err, "is a folder, not an .h5ad file", "ok.h5ad")

    scaled = _adata(
        {"ct": ["a", "b"] * 10}, x=np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    )
    path = _write(tmp_path, scaled, "scaled.h5ad")
    code, _, err = _cli(capsys, "prepare", "--dataset", str(path), "--cell-type-col", "ct", "--out", "o")
    _one_line_error(code, err, "--allow-scaled")


def test_holdout_control_is_explained(tmp_path: Path, capsys) -> None:
    obs = {"p": ["control"] * 12 + ["GENE1"] * 8 + ["GENE2"] * 8 + ["GENE3"] * 8}
    path = _write(tmp_path, _adata(obs))
    code, _, err = _cli(
        capsys,
        "prepare",
        "--dataset",
        str(path),
        "--perturbation-col",
        "p",
        "--split",
        "ood",
        "--holdout",
        "control",
        "--out",
        str(tmp_path / "o"),
    )
    _one_line_error(code, err, "control cells are never held out", "GENE1")


def test_backed_anndata_through_the_python_api(tmp_path: Path) -> None:
    path = _write(tmp_path, _adata({"ct": ["a", "b"] * 10}))
    backed = ad.read_h5ad(path, backed="r")
    data = load_dataset(backed, Columns(cell_type="ct"))
    assert data.adata.n_obs == 20 and any("backed" in n for n in data.notes)
    assert len(cell_sentences(ad.read_h5ad(path, backed="r"), top_k=5)) == 20


def _tiny_folder(folder: Path) -> Path:
    """A model folder's files, enough for the checks that run before anything is loaded."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    save_file({"w": np.zeros((64, 64), dtype=np.float32)}, str(folder / "model.safetensors"))
    return folder


def test_eval_names_the_missing_or_broken_model_file(tmp_path: Path, capsys) -> None:
    prepared = tmp_path / "prepared"
    base = ["eval", "--prepared", str(prepared), "--out", str(tmp_path / "eval"), "--model"]
    code, _, err = _cli(capsys, *base, str(tmp_path / "outputs" / "tiny-cpu" / "sfft"))
    _one_line_error(code, err, "no such model folder", "sfft")

    no_tokenizer = _tiny_folder(tmp_path / "no_tokenizer")
    (no_tokenizer / "tokenizer.json").unlink()
    code, _, err = _cli(capsys, *base, str(no_tokenizer))
    _one_line_error(code, err, str(no_tokenizer), "no tokenizer files")

    truncated = _tiny_folder(tmp_path / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, _, err = _cli(capsys, *base, str(truncated))
    _one_line_error(code, err, str(weights), "truncated")

    no_weights = _tiny_folder(tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    code, _, err = _cli(capsys, *base, str(no_weights))
    _one_line_error(code, err, "has no weights")


def test_eval_split_means_id_or_ood(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", "pbmc68k", "--split", "test", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "--eval-split" in err and "id or ood" in err


def test_launch_refusal_is_printed_once(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Several ranks on a machine without enough GPUs: every rank refuses, only the first says why."""
    from cellduality.train.grpo import main as grpo_main

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.delenv("CELLDUALITY_ALLOW_CPU_MULTIPROCESS", raising=False)
    monkeypatch.delenv("CELLDUALITY_ALLOW_CPU_DEEPSPEED", raising=False)
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # the other ranks' pause before exiting
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert grpo_main(["--config", "recipes/tiny-cpu/grpo_dual.yaml"]) == 2
        err = capsys.readouterr().err
        if rank == "0":
            _one_line_error(2, err, "cellduality.train.grpo: error:", "processes")
        else:
            assert err == ""


# -- the README path: settings travel with the model ----------------------------------------------


def test_run_meta_carries_sentence_settings_and_eval_warns(tmp_path: Path) -> None:
    from cellduality.modeling.checkpoint import RUN_META, sentence_mismatch, write_run_meta
    from cellduality.tasks import PreparedTasks

    data = prepare_anndata(_adata({"ct": ["a", "b"] * 10}), Columns(cell_type="ct"), name="toy")
    trained = build_tasks(data, config=TaskConfig(top_k=16, n_genes=16))
    write_run_meta(str(tmp_path / "sft"), trained, {"stage": "sft"})
    meta = json.loads((tmp_path / "sft" / RUN_META).read_text())
    assert meta["sentences"] == {"toy": {"top_k": 16, "n_genes": 16}}
    (tmp_path / "sft" / "checkpoint-3").mkdir()
    other = build_tasks(data, config=TaskConfig(top_k=100))
    for model in (tmp_path / "sft", tmp_path / "sft" / "checkpoint-3"):
        warning = sentence_mismatch(model, other.meta, "prepared/toy")
        assert warning and "100-gene input sentences" in warning and "--top-k 16 --n-genes 16" in warning
    assert sentence_mismatch(tmp_path / "sft", trained.meta, "same") is None
    assert sentence_mismatch(tmp_path / "elsewhere", other.meta, "no run meta") is None
    assert isinstance(trained, PreparedTasks)


def test_training_subcommands_help_is_fast_and_shows_defaults() -> None:
    import subprocess
    import sys

    for stage in ("sft", "grpo"):
        probe = (
            f"import sys; from cellduality.cli import main; code = main([{stage!r}, '--help']); "
            "print(sorted({'trl', 'torch', 'transformers'} & set(sys.modules)))"
        )
        # fast because nothing heavy is imported (the last line lists which of trl, torch, transformers
        # were): a count, not a clock bound that fails under load; the timeout only stops a hang
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip().endswith("[]"), out.stdout[-500:] + out.stderr
        assert "--sentence_genes" in out.stdout and "(default: 100)" in out.stdout
        assert "--help-all" in out.stdout and len(out.stdout.splitlines()) < 150


def test_every_help_shows_defaults() -> None:
    from cellduality.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("prepare", "eval", "sft-data", "tiny-model", "demo"):
        text = subparsers.choices[name].format_help()
        assert "(default: " in text, name
    assert "(default: 0.25)" in subparsers.choices["prepare"].format_help()
    assert "(default: 600.0)" in subparsers.choices["sft-data"].format_help()  # --timeout, the total
