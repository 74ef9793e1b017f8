"""``cellduality predict`` and ``cellduality.predict``: a briefly trained tiny model on real cells.

Properties: the AnnData written is valid (scanpy opens it) with the new obs columns, predictions are
candidates or flagged invalid; the confidence is the dual score computed without labels; generation
returns the requested counts over the checkpoint's genes; perturbation predictions are in cell-eval's
layout (cell-eval scores them as they are); prompts are the training prompts; bad inputs get one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from cellduality.tasks import TaskConfig, build_tasks, save_prepared

CFG = TaskConfig(top_k=12, max_examples=30, seed=0)
GEN = {"batch_size": 32, "max_new_tokens": 40, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(pbmc, norman, tmp_path_factory):
    """A tiny model, SFT for a few steps on pbmc68k (annotation, generation) and norman_devel (perturbation)."""
    from cellduality.train.sft import parse_args, run_sft

    reuse = os.environ.get("CELLDUALITY_PREDICT_TEST_ROOT")  # a folder this fixture made before (iterating)
    if reuse and (Path(reuse) / "sft" / "cellduality_run.json").exists():
        return Path(reuse)
    root = tmp_path_factory.mktemp("predict")
    folders = []
    for data, tasks in ((pbmc, ["annotation", "generation"]), (norman, ["perturbation"])):
        folders.append(
            str(save_prepared(build_tasks(data, tasks, config=CFG), root / "prepared" / data.name))
        )
    recipe = os.path.join(os.path.dirname(__file__), "..", "recipes", "tiny-cpu", "sft.yaml")
    run_sft(
        *parse_args(
            [
                "--config", recipe,
                "--output_dir", str(root / "sft"),
                "--model_name_or_path", str(root / "model"),
                "--dataset", *folders,
                "--tasks", "annotation", "generation", "perturbation",
                "--tiny_seen_genes_only", "true",
                "--sft_limit", "12",
                "--max_steps", "60",
                "--per_device_train_batch_size", "8",
                "--save_strategy", "no",
            ]
        )
    )  # fmt: skip
    return root


def run_cli(argv, capsys):
    from cellduality.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def pbmc_h5ad(tmp_path_factory):
    """A user-style file: scanpy's pbmc68k_reduced (scaled .X, log-normalised .raw) written to disk."""
    import scanpy as sc

    path = tmp_path_factory.mktemp("user") / "pbmc.h5ad"
    sc.datasets.pbmc68k_reduced()[:60].copy().write_h5ad(path)
    return path


# ------------------------------------------------------------------------------------------ annotation


def test_annotation_writes_a_valid_h5ad(trained, pbmc_h5ad, tmp_path, capsys) -> None:
    import scanpy as sc

    from cellduality.predict import Checkpoint

    out = tmp_path / "annotated.h5ad"
    argv = ["predict", "--task", "annotation", "--model", str(trained / "sft"), "--h5ad", str(pbmc_h5ad)]
    code, _, err = run_cli([*argv, "--out", str(out), "--max-new-tokens", "40", "--no-progress"], capsys)
    assert code == 0, err
    assert "ranked genes from .raw" in err  # what was done to the data is printed
    result = sc.read_h5ad(out)
    user = sc.read_h5ad(pbmc_h5ad)
    assert list(result.obs_names) == list(user.obs_names)
    assert result.obs["bulk_labels"].equals(user.obs["bulk_labels"])  # the user's columns are kept
    candidates = Checkpoint.load(trained / "sft").dataset_for("annotation").labels("annotation")
    labels, valid = result.obs["cellduality_label"], result.obs["cellduality_valid"].to_numpy()
    conf = result.obs["cellduality_confidence"].to_numpy()
    assert set(labels.dropna()) <= set(candidates)
    assert np.array_equal(labels.notna().to_numpy(), valid)  # a prediction is a candidate or flagged invalid
    assert np.all((conf >= 0) & (conf <= 1))
    assert np.all(conf[~valid] == 0)  # no usable answer: the lowest dual score
    assert result.uns["cellduality"]["top_k"] == CFG.top_k


class ForwardScripted:
    """Forward annotation answers name a candidate chosen by the test (a briefly trained tiny model rarely
    does); dual prompts go to the real model, so the confidence is the model's own in-painting."""

    name = "forward-scripted"

    def __init__(self, spec, settings, candidates) -> None:
        from cellduality.inference.generate import HFBackend

        self.model = HFBackend(spec, settings)
        self.chunk_size = 64
        self.candidates = candidates

    def generate(self, prompts, settings):
        duals = [
            i for i, m in enumerate(prompts) if "hidden" in m[-1]["content"] or "missing" in m[-1]["content"]
        ]
        out = [
            f"<think>x</think><answer>{self.candidates[len(m[-1]['content']) % len(self.candidates)]}</answer>"
            for m in prompts
        ]
        for i, text in zip(
            duals, self.model.generate([prompts[i] for i in duals], settings) if duals else [], strict=True
        ):
            out[i] = text
        return out


def test_confidence_is_the_label_free_dual_score(trained, pbmc_h5ad) -> None:
    """The confidence is the dual score of the predicted label, recomputed here by hand with the model;
    it reads no label: the same cells without their cell-type column get the same labels and scores."""
    from cellduality.inference.generate import GenerationSettings, HFBackend, ModelSpec
    from cellduality.parsing import gene_vocabulary
    from cellduality.predict import Checkpoint, annotate
    from cellduality.predict.cells import prepare_cells
    from cellduality.predict.examples import annotation_example
    from cellduality.tasks.dual import dual_prompt, dual_score

    model = str(trained / "sft")
    part = Checkpoint.load(model).dataset_for("annotation")
    candidates = part.labels("annotation")
    user = ad.read_h5ad(pbmc_h5ad)[:12].copy()
    blind = user.copy()
    blind.obs["bulk_labels"] = "unknown"
    results = [
        annotate(
            data, model, copy=True, verbose=False, **GEN,
            backend_factory=lambda spec, settings: ForwardScripted(spec, settings, candidates),
        )
        for data in (user, blind)
    ]  # fmt: skip
    first = results[0].obs
    for column in ("cellduality_label", "cellduality_confidence"):
        assert first[column].astype(object).equals(results[1].obs[column].astype(object))
    assert first["cellduality_valid"].all()

    cells = prepare_cells(user, part)
    settings = GenerationSettings(max_new_tokens=40)
    scores = part.gene_scores(cells.sentences)  # the hidden genes are chosen as in training
    rows = [
        annotation_example(str(user.obs_names[i]), s, candidates, part.config, part.name, gene_scores=scores)
        for i, s in enumerate(cells.sentences)
    ]
    prompts = [
        dual_prompt(r, first.loc[r["cell_id"], "cellduality_label"], seed=part.config.seed) for r in rows
    ]
    duals = HFBackend(ModelSpec(model), settings).generate(prompts, settings)
    vocab = gene_vocabulary(part.genes)
    assert np.allclose(
        [dual_score(r, d, vocab) for r, d in zip(rows, duals, strict=True)], first["cellduality_confidence"]
    )


def test_best_of_n_keeps_the_sample_the_dual_prefers(trained, pbmc_h5ad) -> None:
    """With --samples N the kept answer is the one whose in-painting dual scores highest."""
    from cellduality.predict import Checkpoint, annotate
    from cellduality.predict.cells import prepare_cells
    from cellduality.predict.examples import annotation_example

    user = ad.read_h5ad(pbmc_h5ad)[:3].copy()
    part = Checkpoint.load(trained / "sft").dataset_for("annotation")
    cells = prepare_cells(user, part)
    scores = part.gene_scores(cells.sentences)
    hidden = {}  # visible genes as the dual prompt shows them -> the genes hidden from it
    for i, sentence in enumerate(cells.sentences):
        row = annotation_example(
            str(user.obs_names[i]),
            sentence,
            part.labels("annotation"),
            part.config,
            part.name,
            gene_scores=scores,
        )
        hidden[" ".join(row["visible_genes"])] = row["hidden_genes"]

    class Scripted:
        """Forward samples: 'Dendritic' twice, then 'CD34+'; the dual in-paints the hidden genes only for CD34+."""

        name, chunk_size = "scripted", 64

        def __init__(self) -> None:
            self.n = 0

        def generate(self, prompts, settings):
            out = []
            for messages in prompts:
                text = messages[-1]["content"]
                visible = next((v for v in hidden if v in text), None)
                if "hidden" in text or "missing" in text:
                    genes = hidden[visible] if "CD34+" in text else []
                    out.append(f"<think>x</think><answer>{' '.join(genes)}</answer>")
                else:
                    self.n += 1
                    out.append(
                        f"<think>x</think><answer>{'CD34+' if self.n % 3 == 0 else 'Dendritic'}</answer>"
                    )
            return out

    result = annotate(
        user, str(trained / "sft"), samples=3, copy=True, verbose=False,
        backend_factory=lambda spec, settings: Scripted(), **GEN,
    )  # fmt: skip
    assert (result.obs["cellduality_label"] == "CD34+").all()
    assert (result.obs["cellduality_usable_samples"] == 3).all()
    assert np.allclose(result.obs["cellduality_confidence"], 1.0)  # it named every hidden gene in order


def test_best_of_n_prefers_an_answer_over_none_when_the_duals_tie(trained, pbmc_h5ad) -> None:
    """A sample that names no candidate scores 0; a usable one whose dual also scores 0 must still win
    the tie (the kept answer is the first *usable* best, not an unusable one sampled earlier)."""
    from cellduality.predict import annotate

    user = ad.read_h5ad(pbmc_h5ad)[:4].copy()

    class Scripted:
        """Forward samples per cell: no answer, then 'CD34+'; every dual in-paints nothing (score 0)."""

        name, chunk_size = "scripted", 64

        def generate(self, prompts, settings):
            out = []
            for k, messages in enumerate(prompts):
                text = messages[-1]["content"]
                if "hidden" in text or "missing" in text:
                    out.append("<think>x</think><answer></answer>")
                else:  # the samples of a cell are consecutive: even = first sample
                    out.append(
                        "<think>x</think><answer>no idea</answer>"
                        if k % 2 == 0
                        else "<think>x</think><answer>CD34+</answer>"
                    )
            return out

    result = annotate(
        user, str(trained / "sft"), samples=2, copy=True, verbose=False,
        backend_factory=lambda spec, settings: Scripted(), **GEN,
    )  # fmt: skip
    assert (result.obs["cellduality_usable_samples"] == 1).all()
    assert result.obs["cellduality_valid"].all()
    assert (result.obs["cellduality_label"] == "CD34+").all()
    assert np.allclose(result.obs["cellduality_confidence"], 0.0)


# ------------------------------------------------------------------------------------------ generation


def test_generation_gives_the_requested_cells(trained, tmp_path, capsys) -> None:
    import scanpy as sc

    from cellduality.predict import Checkpoint

    out = tmp_path / "generated.h5ad"
    argv = ["predict", "--task", "generation", "--model", str(trained / "sft"), "--out", str(out)]
    code, _, err = run_cli(
        [*argv, "--conditions", "cd14+ monocyte=5,CD56+ NK=3", "--max-new-tokens", "40"], capsys
    )
    assert code == 0, err
    # batched generation under one progress bar over the 8 cells; its opening "0/8" is always drawn, while
    # the final "8/8" is not when the batch ends within tqdm's refresh interval (then the bar is cleared)
    assert "generating cells" in err and "0/8" in err
    cells = sc.read_h5ad(out)
    part = Checkpoint.load(trained / "sft").dataset_for("generation")
    assert cells.obs["bulk_labels"].value_counts().to_dict() == {"CD14+ Monocyte": 5, "CD56+ NK": 3}
    assert list(cells.var_names) == part.genes
    x = cells.X.toarray()
    assert np.all(x >= 0)
    for sentence, row, valid in zip(
        cells.obs["cellduality_sentence"], x, cells.obs["cellduality_valid"], strict=True
    ):
        genes = sentence.split()
        assert set(genes) <= set(part.genes) and bool(genes) == valid
        assert set(cells.var_names[row > 0]) <= set(genes)  # expression only where the sentence names a gene
    assert set(np.unique(cells.obs["cellduality_confidence"])) <= {0.0, 1.0}


# ---------------------------------------------------------------------------------------- perturbation


def test_perturbation_predictions_are_scored_by_cell_eval(trained, norman, tmp_path, capsys) -> None:
    pytest.importorskip("cell_eval", reason="cell-eval is not installed (pip install -e '.[eval]')")
    from cell_eval import MetricsEvaluator

    adata = norman.adata
    k562 = adata[(adata.obs["cell_type"] == "k562")]
    controls = tmp_path / "controls.h5ad"
    k562[k562.obs["perturbation"] == "control"][:10].copy().write_h5ad(controls)
    out = tmp_path / "perturbed.h5ad"
    argv = ["predict", "--task", "perturbation", "--model", str(trained / "sft"), "--h5ad", str(controls)]
    argv += ["--perturbations", "KLF1,MAP2K6+KLF1", "--cells-per-perturbation", "4", "--out", str(out)]
    code, printed, err = run_cli([*argv, "--real", "norman_devel", "--max-new-tokens", "40"], capsys)
    assert code == 0, err
    command = next(line for line in printed.splitlines() if "cell-eval run -ap" in line)
    # the metrics cell-eval cannot compute on 2 perturbations are skipped (it would log an error)
    assert command.endswith("--celltype-col cell_type --skip-metrics clustering_agreement")
    pred = ad.read_h5ad(out)
    real = ad.read_h5ad(tmp_path / "perturbed.real.h5ad")
    counts = pred.obs["perturbation"].value_counts().to_dict()
    assert counts == {"KLF1": 4, "KLF1+MAP2K6": 4, "control": 10}  # a double in any order
    assert list(pred.var_names) == list(real.var_names) == list(norman.genes)
    assert set(real.obs["perturbation"]) == {"KLF1", "KLF1+MAP2K6", "control"}
    evaluator = MetricsEvaluator(
        adata_pred=str(out), adata_real=str(tmp_path / "perturbed.real.h5ad"), control_pert="control",
        pert_col="perturbation", num_threads=1, outdir=str(tmp_path / "cell_eval"),
    )  # fmt: skip
    results, _ = evaluator.compute(profile="minimal", write_csv=False)
    assert sorted(results["perturbation"].to_list()) == ["KLF1", "KLF1+MAP2K6"]
    assert "pearson_delta" in results.columns


# ------------------------------------------------------------------------------------------ prompts


def test_prediction_prompts_are_the_training_prompts(pbmc) -> None:
    """For the same cell, candidates and gene scores, predict's prompt, dual inputs and candidate order
    are the task builders' (if a builder changes how it asks, this fails)."""
    from cellduality.predict.examples import annotation_example, generation_example
    from cellduality.sentences import cell_sentences
    from cellduality.tasks.classification import annotation_rows
    from cellduality.tasks.common import presence_scores
    from cellduality.tasks.generative import generation_rows

    sentences = cell_sentences(pbmc.adata, top_k=CFG.top_k, seed=CFG.seed)
    scores = presence_scores(sentences)
    cells = np.arange(0, 700, 97)
    candidates = sorted(pbmc.adata.obs["bulk_labels"].astype(str).unique())
    fields = ("prompt", "candidates", "visible_genes", "hidden_genes", "cell_genes")
    extra = {"pool": candidates, "gene_scores": scores}
    for row in annotation_rows(
        pbmc.adata.obs, sentences, cells, pbmc.columns, "pbmc68k", "test", CFG, **extra
    ).to_pylist():
        i = list(pbmc.adata.obs_names).index(row["cell_id"])
        mine = annotation_example(
            row["cell_id"], sentences[i], candidates, CFG, "pbmc68k", split="test", gene_scores=scores
        )
        assert {k: mine[k] for k in fields} == {k: row[k] for k in fields}
    for row in generation_rows(
        pbmc.adata.obs, sentences, cells, pbmc.columns, "pbmc68k", "test", CFG, **extra
    ).to_pylist():
        mine = generation_example(row["cell_id"], row["condition"], candidates, CFG, "pbmc68k", split="test")
        assert mine["prompt"] == row["prompt"] and mine["candidates"] == row["candidates"]


# ------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs_get_one_line_errors(trained, pbmc_h5ad, norman, tmp_path, capsys) -> None:
    sft = str(trained / "sft")
    out = str(tmp_path / "x.h5ad")
    controls = tmp_path / "controls.h5ad"
    k562 = norman.adata[(norman.adata.obs["cell_type"] == "k562").to_numpy()]
    k562[(k562.obs["perturbation"] == "control").to_numpy()][:4].copy().write_h5ad(controls)
    other = tmp_path / "other_genes.h5ad"
    rng = np.random.default_rng(0)
    ad.AnnData(
        X=rng.poisson(1.0, (20, 50)).astype(np.float32),
        var=pd.DataFrame(index=[f"NOTAGENE{i}" for i in range(50)]),
    ).write_h5ad(other)
    cases = {
        "unknown condition": (
            ["--task", "generation", "--model", sft, "--conditions", "Hepatocyte=3"], "unknown condition 'Hepatocyte'"
        ),
        "unknown perturbation": (
            ["--task", "perturbation", "--model", sft, "--h5ad", str(pbmc_h5ad), "--perturbations", "NOTAGENE"],
            "unknown perturbation 'NOTAGENE'",
        ),
        "genes missing": (["--task", "annotation", "--model", sft, "--h5ad", str(other)], "of the checkpoint's"),
        "no run metadata": (["--task", "annotation", "--model", str(trained / "model"), "--h5ad", str(pbmc_h5ad)], "no run metadata"),
        "no such file": (["--task", "annotation", "--model", sft, "--h5ad", str(tmp_path / "nope.h5ad")], "no such file"),
        "a file as model": (
            ["--task", "annotation", "--model", str(trained / "sft" / "config.json"), "--h5ad", str(pbmc_h5ad)],
            "give the model's folder",
        ),
        "wrong task name": (["--task", "annotate", "--model", sft, "--h5ad", str(pbmc_h5ad)], "invalid choice: 'annotate'"),
        "no --model": (["--task", "annotation", "--h5ad", str(pbmc_h5ad)], "--model"),
        "no cell per perturbation": (
            ["--task", "perturbation", "--model", sft, "--h5ad", str(controls), "--perturbations", "KLF1",
             "--cells-per-perturbation", "0"],
            "--cells-per-perturbation must be at least 1",
        ),
        "missing observed cells": (
            ["--task", "perturbation", "--model", sft, "--h5ad", str(controls), "--perturbations", "KLF1",
             "--real", str(tmp_path / "nope_real.h5ad")],
            "no such file",
        ),
        "negative temperature": (
            ["--task", "generation", "--model", sft, "--conditions", "CD34+=2", "--temperature", "-1"],
            "--temperature",
        ),
        "no batch": (
            ["--task", "generation", "--model", sft, "--conditions", "CD34+=2", "--batch-size", "0"],
            "--batch-size",
        ),
    }  # fmt: skip
    for name, (argv, expected) in cases.items():
        code, _, err = run_cli(["predict", *argv, "--out", out], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("cellduality predict: error:"), (name, err)
        assert expected in lines[0], (name, lines[0])
        assert "Traceback" not in err
        assert not Path(out).exists(), name  # refused before anything is generated or written


def test_run_metadata_records_candidates(trained) -> None:
    meta = json.loads((trained / "sft" / "cellduality_run.json").read_text())["prepared"]["parts"]
    assert len(meta["pbmc68k"]["labels"]["annotation"]) == 10
    labels = meta["norman_devel"]["labels"]["perturbation"]
    assert labels["conditions"]["KLF1"] == {"cell type: k562": "overexpression (CRISPRa) of KLF1"}
    assert "KLF1" in labels["trained"] and "control" not in labels["trained"]
    assert meta["pbmc68k"]["hidden_genes"]["scores"]  # the in-painting dual hides genes as in training


def test_eval_puts_cell_eval_next_to_our_metrics(trained, tmp_path) -> None:
    pytest.importorskip("cell_eval", reason="cell-eval is not installed (pip install -e '.[eval]')")
    from cellduality.eval.runner import EvalConfig, run_eval
    from cellduality.inference.generate import GenerationSettings, ModelSpec

    config = EvalConfig(
        out_dir=tmp_path / "eval", models=[ModelSpec(str(trained / "sft"), name="tiny")], max_examples=6,
        generation=GenerationSettings(max_new_tokens=40, batch_size=32), progress=False, plots=False,
        cell_eval=True,
    )  # fmt: skip
    run_eval(trained / "prepared" / "norman_devel", config)
    found = json.loads((tmp_path / "eval" / "metrics.json").read_text())["tasks"]["perturbation"]["info"][
        "cell_eval"
    ]
    assert set(found["methods"]) == {"tiny", "control cell's sentence"}
    for item in found["methods"].values():
        assert "pearson_delta" in item["metrics"] and item["per_perturbation"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert (
        "cell-eval (the field's reference evaluator)" in report and "Where the definitions differ" in report
    )


def test_cell_eval_skips_what_it_cannot_compute_on_one_perturbation(norman, caplog) -> None:
    """One perturbation per context (the glioblastoma demo): every metric cell-eval can compute is there,
    and none it cannot compute is attempted (cell-eval would log an error for each context)."""
    pytest.importorskip("cell_eval", reason="cell-eval is not installed (pip install -e '.[eval]')")
    import logging

    from cellduality.eval.cell_eval import CONTEXT_COL, PERT_COL, score

    adata = norman.adata
    obs = adata.obs
    keep = ((obs["cell_type"] == "k562") & obs["perturbation"].isin(["KLF1", "control"])).to_numpy()
    real = ad.AnnData(
        X=adata.X[keep].toarray() if hasattr(adata.X, "toarray") else adata.X[keep],
        obs=pd.DataFrame(
            {PERT_COL: obs["perturbation"].to_numpy()[keep], CONTEXT_COL: "cell type: k562"},
            index=adata.obs_names[keep],
        ),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    pred = real.copy()
    pred.X = np.roll(pred.X, 1, axis=0)  # another cell's profile: a prediction, not the data itself
    with caplog.at_level(logging.ERROR, logger="cell_eval"):
        found = score(pred, real, num_threads=1)
    assert not [r for r in caplog.records if "Error computing metric" in r.getMessage()]
    assert list(found["per_perturbation"]) == ["KLF1 (cell type: k562)"]
    assert np.isfinite(found["metrics"]["pearson_delta"]) and np.isfinite(found["metrics"]["mae"])


# ------------------------------------------------------------------------------------ existing outputs


def test_existing_outputs_are_refused_before_any_work(pbmc_h5ad, tmp_path, capsys) -> None:
    """An existing --out, or its .real.h5ad companion, is refused (exit 2, one line) unless --overwrite, before
    the model is even looked at (the model folder here does not exist); an input is never an output."""
    model = str(tmp_path / "no_model")
    out = tmp_path / "annotated.h5ad"
    out.write_bytes(b"yesterday's annotations")
    real = tmp_path / "perturbed.real.h5ad"
    real.write_bytes(b"yesterday's observed cells")
    perturb = [
        "--task",
        "perturbation",
        "--model",
        model,
        "--h5ad",
        str(pbmc_h5ad),
        "--perturbations",
        "KLF1",
    ]
    cases = {
        "existing out": (["--task", "annotation", "--model", model, "--h5ad", str(pbmc_h5ad), "--out", str(out)],
                         f"{out} already exists; give another --out, or --overwrite to replace"),
        "existing companion": ([*perturb, "--real", "norman_devel", "--out", str(tmp_path / "perturbed.h5ad")],
                               f"{real} already exists"),
        "out is the input": (["--task", "annotation", "--model", model, "--h5ad", str(pbmc_h5ad), "--out",
                              str(pbmc_h5ad), "--overwrite"], "is also --h5ad"),
        "real-out is out": ([*perturb, "--real", "norman_devel", "--out", str(tmp_path / "p.h5ad"), "--real-out",
                             str(tmp_path / "p.h5ad")], "is the same file as --out"),
    }  # fmt: skip
    for name, (argv, expected) in cases.items():
        code, _, err = run_cli(["predict", *argv], capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (name, err)
    assert (
        out.read_bytes() == b"yesterday's annotations" and real.read_bytes() == b"yesterday's observed cells"
    )
    # with --overwrite the refusal is gone: the run gets as far as the (missing) model
    code, _, err = run_cli(["predict", *cases["existing out"][0], "--overwrite"], capsys)
    assert code == 2 and "already exists" not in err and "no_model" in err, err
    assert out.read_bytes() == b"yesterday's annotations"


def test_a_failed_write_leaves_the_earlier_file_whole(tmp_path) -> None:
    from cellduality.predict.command import write_h5ad_atomic

    path = tmp_path / "cells.h5ad"
    write_h5ad_atomic(ad.AnnData(np.ones((3, 2), dtype=np.float32)), path)
    before = path.read_bytes()
    broken = ad.AnnData(np.zeros((5, 2), dtype=np.float32))
    broken.uns["not storable"] = object()  # h5ad cannot hold it: the write fails part-way
    with pytest.raises(Exception, match="object"):
        write_h5ad_atomic(broken, path)
    assert path.read_bytes() == before and ad.read_h5ad(path).n_obs == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad"]  # no temporary file left
