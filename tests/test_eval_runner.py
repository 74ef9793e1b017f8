"""The benchmark evaluation end to end: scoring of completions, baselines on real data (pbmc68k,
norman_devel), the tiny model through the Hugging Face backend, the completion cache, dual
self-verification and the ``eval`` subcommand.

Scripted backends (answers chosen by the test) stand in for a model wherever the point is the runner's
logic rather than generation itself; one test runs the real tiny model. Everything is kept small
(``top_k=16``, a few dozen examples, a few new tokens) because this suite runs on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

from cellduality.eval.runner import EvalConfig, run_eval
from cellduality.eval.scoring import (
    GenerationReference,
    classification_predictions,
    generated_sentences,
    score_classification,
)
from cellduality.inference.generate import GenerationSettings, ModelSpec, load_backend
from cellduality.tasks import TaskConfig, build_tasks, dual_prompt, save_prepared
from cellduality.tasks.real_data import RealData

CFG = TaskConfig(top_k=16, max_examples=24, seed=0)


def formatted(answer: str) -> str:
    return f"<think>because</think><answer>{answer}</answer>"


class Scripted:
    """A backend whose answer is ``answer(messages, settings)``; counts calls and prompts."""

    name = "scripted"

    def __init__(self, answer, chunk_size: int = 8, fail_on_call: int | None = None) -> None:
        self.answer = answer
        self.chunk_size = chunk_size
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.prompts = 0

    def generate(self, prompts, settings):
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("simulated crash (out of memory)")
        self.prompts += len(prompts)
        return [self.answer(m, settings) for m in prompts]


def factory(backend):
    return lambda spec, settings: backend


def oracle(prepared):
    """Answers every forward prompt with its true answer, correctly formatted."""
    truth = {r["prompt"][1]["content"]: r["answer"] for split in prepared.datasets.values() for r in split}
    return lambda messages, settings: formatted(truth.get(messages[-1]["content"], ""))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two torch threads on a busy 2-core machine made generation 20x slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pbmc_prepared(pbmc, tmp_path_factory):
    prepared = build_tasks(pbmc, ["annotation", "generation"], config=CFG)
    path = save_prepared(prepared, tmp_path_factory.mktemp("pbmc") / "prepared")
    return path, prepared


@pytest.fixture(scope="module")
def norman_prepared(norman, tmp_path_factory):
    prepared = build_tasks(norman, config=TaskConfig(top_k=16, max_examples=40, seed=0))
    path = save_prepared(prepared, tmp_path_factory.mktemp("norman") / "prepared")
    return path, prepared


def load_metrics(out) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------- scoring


def test_scoring_counts_valid_invalid_and_format(pbmc, pbmc_prepared) -> None:
    _, prepared = pbmc_prepared
    test = prepared.datasets["test"].to_list()
    rows = [r for r in test if r["task"] == "annotation"][:4]
    wrong = next(c for c in rows[1]["candidates"] if c != rows[1]["answer"])
    completions = [
        formatted(rows[0]["answer"]),  # right, well formed
        formatted(wrong),  # wrong label, well formed
        "it is probably a T cell",  # no answer at all
        f"<answer>{rows[3]['answer'].upper()}.</answer>",  # right label (case/punctuation), bad format
    ]
    preds = classification_predictions(rows, completions)
    assert preds == [rows[0]["answer"], wrong, None, rows[3]["answer"]]
    labels = sorted({c for r in rows for c in r["candidates"]})
    score = score_classification("m", "model", rows, preds, labels, completions)
    assert score.metrics["accuracy"] == pytest.approx(0.5)
    assert score.metrics["valid_output_rate"] == pytest.approx(0.75)
    assert score.metrics["format_rate"] == pytest.approx(0.5)
    assert score.confusion.shape == (len(labels), len(labels) + 1)
    assert score.confusion[:, -1].sum() == 1  # the answer-less completion is counted as invalid

    real = RealData(pbmc, prepared.meta)
    gen_rows = [r for r in test if r["task"] == "generation"][:3]
    gen_completions = [formatted(gen_rows[0]["answer"]), formatted("NOTAGENE xyz"), ""]
    sentences = generated_sentences(gen_rows, gen_completions, real.vocabulary)
    assert [len(s) for s in sentences] == [len(gen_rows[0]["answer"].split()), 0, 0]
    ref = GenerationReference(gen_rows, real, k=3)
    gen = ref.score("m", "model", sentences, gen_completions)
    assert gen.metrics["valid_output_rate"] == pytest.approx(1 / 3)
    assert gen.metrics["format_rate"] == pytest.approx(2 / 3)
    assert gen.metrics["rwjs_nearest"] == pytest.approx(1 / 3)  # its own real cell, then two empty ones
    assert gen.points.shape == (1, 2) and gen.point_labels == [gen_rows[0]["condition"]]


def test_model_without_valid_answers_still_gets_a_report(pbmc_prepared, norman_prepared, tmp_path) -> None:
    mute = Scripted(lambda m, s: "I am not sure.")
    for name, (path, _) in {"pbmc": pbmc_prepared, "norman": norman_prepared}.items():
        out = tmp_path / name
        config = EvalConfig(
            out_dir=out, models=[ModelSpec("mute")], max_examples=12, baselines=False, progress=False
        )
        run_eval(path, config, backend_factory=factory(mute))
        tasks = load_metrics(out)["tasks"]
        for task, item in tasks.items():
            metrics = item["methods"]["mute"]["metrics"]
            assert metrics["valid_output_rate"] == 0.0, task
            assert metrics["format_rate"] == 0.0, task
        report = (out / "report.md").read_text()
        assert "| mute | model |" in report
        if name == "pbmc":
            assert tasks["annotation"]["methods"]["mute"]["metrics"]["accuracy"] == 0.0
            assert tasks["generation"]["methods"]["mute"]["metrics"]["knn_accuracy"] == 0.0
            assert tasks["generation"]["methods"]["mute"]["metrics"]["scfid"] is None  # not measurable
        else:
            assert tasks["perturbation"]["methods"]["mute"]["metrics"]["pearson_delta"] is None
            assert tasks["perturbation"]["methods"]["mute"]["metrics"]["n_scored"] == 0.0


# ---------------------------------------------------------------------------------------------- baselines


def test_baselines_on_pbmc_through_the_eval_command(pbmc_prepared, tmp_path) -> None:
    from cellduality.eval.command import add_parser

    path, _ = pbmc_prepared
    parser = argparse.ArgumentParser(prog="cellduality")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "baselines"
    args = parser.parse_args(
        ["eval", "--prepared", str(path), "--out", str(out), "--no-progress", "--no-plots"]
    )
    assert args.func(args) == 0
    tasks = load_metrics(out)["tasks"]
    ann = {k: v["metrics"] for k, v in tasks["annotation"]["methods"].items()}
    assert set(ann) == {"majority class", "kNN on expression", "logistic regression"}
    assert ann["logistic regression"]["accuracy"] > ann["majority class"]["accuracy"]
    assert ann["kNN on expression"]["accuracy"] > ann["majority class"]["accuracy"]
    gen = {k: v["metrics"] for k, v in tasks["generation"]["methods"].items()}
    assert gen["real cells' own sentences"]["rwjs_nearest"] == pytest.approx(1.0)
    # real cells are a reference, not a ceiling: the class-mean prototype can beat them on kNN
    assert tasks["generation"]["methods"]["real cells' own sentences"]["kind"] == "reference"
    assert not any(v["kind"] == "ceiling" for t in tasks.values() for v in t["methods"].values())
    assert gen["class-mean sentence"]["knn_accuracy"] > 0.3
    assert gen["class-mean sentence"]["rwjs_nearest"] > 0.2
    report = (out / "report.md").read_text()
    assert "## Cell type annotation" in report and "| logistic regression | baseline |" in report


def test_perturbation_metrics_and_baselines_on_norman(norman_prepared, tmp_path) -> None:
    path, prepared = norman_prepared
    out = tmp_path / "norman"
    config = EvalConfig(out_dir=out, models=[ModelSpec("oracle")], progress=False)
    run_eval(path, config, backend_factory=factory(Scripted(oracle(prepared))))
    methods = load_metrics(out)["tasks"]["perturbation"]["methods"]
    assert list(methods) == [
        "oracle",
        "control cell's sentence",
        "control mean",
        "mean perturbation",
        "perturbation's training mean",
        "GO graph neighbour",
        "split-half reproducibility",
    ]
    m = {k: v["metrics"] for k, v in methods.items()}
    assert m["oracle"]["valid_output_rate"] == 1.0 and m["oracle"]["format_rate"] == 1.0
    # the oracle's cells are the observed cells themselves (through the inverse fit)
    assert m["oracle"]["pearson_delta_de"] > m["mean perturbation"]["pearson_delta_de"]
    assert m["oracle"]["retrieval"] > 0.8
    assert m["control mean"]["pearson_delta"] is None  # a zero delta has no correlation
    assert m["control mean"]["rmse_de"] > 0  # ... but its error is the size of the true effect
    assert 0.0 <= m["mean perturbation"]["retrieval"] <= 1.0
    assert m["oracle"]["scfid"] is not None and m["mean perturbation"].get("scfid") is None
    assert "pathway_cosine" in m["oracle"] and m["split-half reproducibility"]["pearson_delta"] is not None
    assert methods["split-half reproducibility"]["kind"] == "reference"  # not a bound: see its note
    assert "not an upper bound" in methods["split-half reproducibility"]["note"]
    per_half = methods["split-half reproducibility"]["per_condition"].values()
    assert all(
        v[k] is None or -1.0 <= v[k] <= 1.0 for v in per_half for k in ("pearson_delta", "pearson_delta_de")
    )
    per = methods["oracle"]["per_condition"]
    assert len(per) == m["oracle"]["n_perturbations"] and all("pearson_delta" in v for v in per.values())
    assert (out / "plots" / "pearson_delta_per_perturbation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### Pearson Δ (all genes) ↑ per perturbation (all " in (out / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- tiny model


class CountingHF:
    """The real Hugging Face backend, counting model loads and generate calls."""

    def __init__(self) -> None:
        self.loads = 0
        self.calls = 0

    def __call__(self, spec, settings):
        self.loads += 1
        backend = load_backend(spec, settings, "hf")
        inner = backend.generate

        def generate(prompts, s):
            self.calls += 1
            return inner(prompts, s)

        backend.generate = generate
        return backend


def test_tiny_model_end_to_end_cache_reuse_and_self_verify(pbmc_prepared, tmp_path) -> None:
    from cellduality.modeling import ensure_tiny_model

    path, prepared = pbmc_prepared
    texts = [r["prompt"] for split in prepared.datasets.values() for r in split]
    texts += [r["answer"] for r in prepared.datasets["train"]]
    model = ensure_tiny_model(tmp_path / "m", prepared.genes, texts)
    out = tmp_path / "eval"
    settings = GenerationSettings(max_new_tokens=6, batch_size=16)
    config = EvalConfig(
        out_dir=out, models=[ModelSpec(str(model), name="tiny")], max_examples=6, generation=settings,
        self_verify=2, progress=False,
    )  # fmt: skip
    first = CountingHF()
    run_eval(path, config, backend_factory=first)
    assert first.loads == 1 and first.calls >= 2  # forward answers, then the samples
    metrics = load_metrics(out)
    for task in ("annotation", "generation"):
        methods = metrics["tasks"][task]["methods"]
        assert {"tiny", "tiny + self-verify@2"} <= set(methods)
        for name in ("tiny", "tiny + self-verify@2"):
            assert methods[name]["metrics"]["format_rate"] <= 0.2  # untrained: (almost) never well formed
            assert methods[name]["metrics"]["valid_output_rate"] <= 0.5
    assert metrics["run"]["models"][0]["self_verify"]["any_sample_valid"] <= 0.5
    report = (out / "report.md").read_text()
    assert "| tiny | model |" in report and "| tiny + self-verify@2 | model |" in report

    again = CountingHF()
    run_eval(path, config, backend_factory=again)
    assert again.loads == 0 and again.calls == 0  # everything came from the cache
    assert load_metrics(out)["tasks"] == metrics["tasks"]

    # adding a model to the comparison generates for that model only
    second = Scripted(lambda m, s: formatted("CD14+ Monocyte"))
    counts = CountingHF()

    def mixed(spec, s):
        return second if spec.path == "other" else counts(spec, s)

    config.models = [ModelSpec(str(model), name="tiny"), ModelSpec("other")]
    run_eval(path, config, backend_factory=mixed)
    assert counts.loads == 0 and second.calls > 0
    assert [m["generated"] for m in load_metrics(out)["run"]["models"]] == [False, True]


def test_self_verify_keeps_the_answer_whose_dual_the_model_solves(pbmc_prepared, tmp_path) -> None:
    """Greedy answers are wrong; of two samples the second is right, and only its dual is solved."""
    from cellduality.parsing import gene_vocabulary
    from cellduality.tasks import forward_answer

    path, prepared = pbmc_prepared
    vocab = gene_vocabulary(prepared.genes)
    rows = [r for r in prepared.datasets["test"] if r["task"] in ("annotation", "generation")]
    # keyed by prompt text: generation prompts name only the type, so rows of one type share them
    right, wrong, solved = {}, {}, {}
    for r in rows:
        text = r["prompt"][1]["content"]
        if r["task"] == "annotation":
            right[text] = formatted(r["answer"])
            wrong[text] = formatted(next(c for c in r["candidates"] if c != r["answer"]))
            # in-painting the hidden genes succeeds only from the right label
            solved[dual_prompt(r, r["answer"])[1]["content"]] = formatted(" ".join(r["hidden_genes"]))
        else:
            other = next(o for o in rows if o["task"] == "generation" and o["condition"] != r["condition"])
            right.setdefault(text, formatted(r["answer"]))  # a real cell of the prompted type
            wrong.setdefault(text, formatted(other["answer"]))  # a real cell of another type
    for r in rows:  # the generated cell's type is recognised only for a cell of the prompted type
        if r["task"] == "generation":
            dual = dual_prompt(r, forward_answer(r, right[r["prompt"][1]["content"]], vocab))
            solved[dual[1]["content"]] = formatted(r["condition"])
    seen: dict[str, int] = {}

    def answer(messages, settings):
        text = messages[-1]["content"]
        if text in solved:
            return solved[text]
        if text not in right:
            return formatted("")  # the dual of a wrong answer: not solved
        if not settings.do_sample:
            return wrong[text]
        seen[text] = seen.get(text, 0) + 1  # a row's two samples are adjacent: wrong, then right
        return right[text] if seen[text] % 2 == 0 else wrong[text]

    out = tmp_path / "sv"
    config = EvalConfig(
        out_dir=out, models=[ModelSpec("m")], self_verify=2, baselines=False, plots=False, progress=False,
    )  # fmt: skip
    run_eval(path, config, backend_factory=factory(Scripted(answer, chunk_size=64)))
    metrics = load_metrics(out)
    ann = metrics["tasks"]["annotation"]["methods"]
    assert ann["m"]["metrics"]["accuracy"] == 0.0
    assert ann["m + self-verify@2"]["metrics"]["accuracy"] == 1.0
    gen = metrics["tasks"]["generation"]["methods"]
    assert gen["m"]["metrics"]["rwjs_nearest"] < 1.0
    assert gen["m + self-verify@2"]["metrics"]["rwjs_nearest"] == pytest.approx(1.0)
    stats = metrics["run"]["models"][0]["self_verify"]
    assert stats["changed_from_first"] == 1.0 and stats["dual_score_chosen"] == pytest.approx(1.0)


def test_self_verify_prefers_an_answer_over_none_when_the_duals_tie(pbmc_prepared, tmp_path) -> None:
    """Of two samples the first names no candidate and the second a wrong one whose dual is not solved
    either: both score 0, and the kept answer is the usable one (as in `cellduality predict --samples`)."""
    path, prepared = pbmc_prepared
    rows = [r for r in prepared.datasets["test"] if r["task"] == "annotation"]
    wrong = {
        r["prompt"][1]["content"]: formatted(next(c for c in r["candidates"] if c != r["answer"]))
        for r in rows
    }
    seen: dict[str, int] = {}

    def answer(messages, settings):
        text = messages[-1]["content"]
        if text not in wrong or not settings.do_sample:
            return formatted("")  # duals (never solved), generation, greedy answers: nothing usable
        seen[text] = seen.get(text, 0) + 1  # a row's two samples are adjacent: none, then a wrong label
        return wrong[text] if seen[text] % 2 == 0 else formatted("")

    out = tmp_path / "sv_tie"
    config = EvalConfig(
        out_dir=out, models=[ModelSpec("m")], self_verify=2, baselines=False, plots=False, progress=False,
    )  # fmt: skip
    run_eval(path, config, backend_factory=factory(Scripted(answer, chunk_size=64)))
    ann = load_metrics(out)["tasks"]["annotation"]["methods"]
    assert ann["m"]["metrics"]["valid_output_rate"] == 0.0
    assert ann["m + self-verify@2"]["metrics"]["valid_output_rate"] == 1.0
    assert ann["m + self-verify@2"]["metrics"]["accuracy"] == 0.0


def test_a_crash_keeps_what_was_generated(pbmc_prepared, tmp_path) -> None:
    path, prepared = pbmc_prepared
    config = EvalConfig(
        out_dir=tmp_path / "crash", models=[ModelSpec("m")], max_examples=10, baselines=False, plots=False,
        progress=False,
    )  # fmt: skip
    crashing = Scripted(oracle(prepared), chunk_size=8, fail_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(path, config, backend_factory=factory(crashing))
    resumed = Scripted(oracle(prepared), chunk_size=8)
    run_eval(path, config, backend_factory=factory(resumed))
    assert resumed.prompts == 20 - 8  # two tasks x 10 examples, minus the batch saved before the crash
    assert (
        load_metrics(tmp_path / "crash")["tasks"]["annotation"]["methods"]["m"]["metrics"]["accuracy"] == 1.0
    )


def test_eval_several_prepared_folders(tmp_path) -> None:
    """`--prepared A B`: one report per dataset, one shared cache, an index linking them."""
    from cellduality.cli import main
    from cellduality.data import load_dataset as load
    from cellduality.tasks import TaskConfig as Cfg
    from cellduality.tasks import build_tasks as build
    from cellduality.tasks import save_prepared as save

    folders = []
    for name in ("pbmc68k", "scad_plx4720"):
        folders.append(save(build(load(name), config=Cfg(top_k=8, max_examples=12)), tmp_path / name))
    out = tmp_path / "eval"
    code = main(["eval", "--prepared", *map(str, folders), "--out", str(out), "--no-plots", "--no-progress"])
    assert code == 0
    index = (out / "index.md").read_text()
    for name in ("pbmc68k", "scad_plx4720"):
        assert (out / name / "report.md").exists() and f"[{name}/report.md]" in index
    assert "drug_sensitivity" in index and "annotation" in index
    assert main(["eval", "--prepared", *map(str, folders), "--data", "x.h5ad", "--out", str(out)]) == 2


def _user_file_with_a_layer(pbmc_file, path) -> None:
    """pbmc68k_reduced as a user's file that only reads right with ``--layer lognorm --gene-symbols
    symbol``: the log-normalised matrix in a layer, ``.X`` the same values shuffled across genes, and
    IDs as ``var_names`` with the symbols in a column."""
    import anndata as ad
    import numpy as np

    source = ad.read_h5ad(pbmc_file)
    lognorm = np.asarray(source.raw.X.todense() if hasattr(source.raw.X, "todense") else source.raw.X)
    shuffled = lognorm[:, np.random.default_rng(0).permutation(lognorm.shape[1])]
    var = source.raw.var.copy()
    var["symbol"] = list(source.raw.var_names)
    var.index = [f"gene{i}" for i in range(len(var))]
    user = ad.AnnData(X=shuffled, obs=source.obs[["bulk_labels"]].copy(), var=var)
    user.layers["lognorm"] = lognorm
    user.write_h5ad(path)


def test_a_prepared_folder_tells_eval_where_its_data_is(pbmc_file, tmp_path, capsys) -> None:
    """`prepare` records the file, layer and gene-symbol column it read; `eval --prepared` re-reads the
    real cells from them without --data/--layer/--gene-symbols; flags given win; a moved file is one line."""
    from cellduality.cli import main
    from cellduality.data.schema import DataError
    from cellduality.tasks import load_prepared
    from cellduality.tasks.real_data import load_real_data

    user = tmp_path / "atlas.h5ad"
    _user_file_with_a_layer(pbmc_file, user)
    folder = tmp_path / "prepared"
    argv = ["prepare", "--dataset", str(user), "--cell-type-col", "bulk_labels", "--layer", "lognorm"]
    argv += ["--gene-symbols", "symbol", "--tasks", "generation", "--top-k", "8", "--max-examples", "12"]
    assert main([*argv, "--out", str(folder)]) == 0
    meta = load_prepared(folder).meta
    assert meta["source"]["path"] == str(user.resolve())
    assert (meta["source"]["layer"], meta["source"]["gene_symbols"]) == ("lognorm", "symbol")

    recorded = load_real_data(meta)  # nothing repeated
    explicit = load_real_data(meta, user, layer="lognorm", gene_symbols="symbol")
    assert recorded.genes == explicit.genes and (recorded.x != explicit.x).nnz == 0

    out = tmp_path / "eval"
    assert main(["eval", "--prepared", str(folder), "--out", str(out), "--no-plots", "--no-progress"]) == 0
    assert (out / "metrics.json").exists()

    moved = tmp_path / "moved.h5ad"
    user.rename(moved)
    with pytest.raises(DataError, match=r"prepared from .*atlas\.h5ad, which no longer exists.*--data"):
        load_real_data(meta)
    capsys.readouterr()
    assert main(["eval", "--prepared", str(folder), "--out", str(tmp_path / "e2"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no longer exists" in error
    # a flag given wins over the record: the moved file, with the recorded layer and symbols
    again = load_real_data(meta, moved)
    assert again.genes == explicit.genes and (again.x != explicit.x).nnz == 0
    with pytest.raises(DataError, match="layer"):  # and an explicit --layer wins over the recorded one
        load_real_data(meta, moved, layer="no_such_layer")
