"""Knowledge-graph neighbourhood editing: answer parsing, rewards on constructed deltas, the builder on
norman_devel (CRISPRa K562 + the McFaline-Figueroa CRISPRi lines), edge-list graphs, the dual and SFT
code skipping the task, and the evaluation on held-out targets.

GRPO training on the task is in ``test_train_grpo.py``.
"""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from cellduality.data import DataError, load_dataset
from cellduality.rewards import REWARDS, USES_LABELS, DualReward, RewardContext, build_rewards
from cellduality.rewards.neighbourhood import (
    EMPTY_EDIT_PENALTY,
    NO_EDIT_SCORE,
    NeighbourhoodFormat,
    NeighbourhoodGain,
    NeighbourhoodValidity,
)
from cellduality.tasks import (
    TaskConfig,
    build_tasks,
    dual_prompt,
    forward_answer,
    load_prepared,
    save_prepared,
)
from cellduality.tasks.dual import has_dual
from cellduality.tasks.neighbourhood import (
    DELTA_TABLE,
    DeltaTable,
    cap_neighbours,
    edit_gain,
    format_edit,
    greedy_edit,
    parse_edit,
    read_edge_list,
    resolve_edit,
)
from cellduality.train.configs import check_reward_mode

CFG = TaskConfig(top_k=16, seed=0)


def _c(answer: str, think: str = "t") -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"<think>{think}</think><answer>{answer}</answer>"}]


def _columns(rows):
    return {k: [r[k] for r in rows] for k in rows[0]}


# ------------------------------------------------------------------------------------------ parsing


def test_parse_edit() -> None:
    edit = parse_edit(_c("add: KLF1, map2k6; remove: none"))
    assert edit is not None and edit.additions == ("KLF1", "map2k6") and edit.removals == ()
    assert edit.well_formed and not edit.empty
    two_lines = parse_edit(_c("Add: KLF1+MAP2K6\nRemove: SGK1 TGFBR2, SGK1"))
    assert two_lines.additions == ("KLF1+MAP2K6",) and two_lines.removals == ("SGK1", "TGFBR2")
    assert parse_edit(_c("add: none; remove: none")).empty
    assert not parse_edit(_c("I think add: KLF1")).well_formed  # text before the clauses
    assert not parse_edit(_c("add: A; add: B")).well_formed  # a clause twice
    assert parse_edit(_c("KLF1, SGK1")) is None  # no clause
    assert parse_edit("no tags at all") is None and parse_edit("") is None and parse_edit(None) is None
    assert format_edit(["A", "B"], []) == "add: A, B; remove: none"
    assert parse_edit(_c(format_edit(["A"], ["B"]))).removals == ("B",)


def test_resolve_edit() -> None:
    edit = parse_edit(_c("add: c1, N1, nope; remove: n2, c2"))
    resolved = resolve_edit(edit, neighbours=["N1", "N2"], candidates=["C1", "C2"])
    assert resolved.added == ("C1",) and resolved.removed == ("N2",)
    assert set(resolved.invalid) == {"N1", "nope", "c2"}  # adding a neighbour / removing a candidate: invalid
    assert resolved.final == ("N1", "C1") and resolved.valid_fraction == pytest.approx(2 / 5)
    assert resolve_edit(None, ["N1"], ["C1"]).final == ("N1",)  # no edit keeps the neighbourhood


# ------------------------------------------------------------------------------------------ rewards


@pytest.fixture()
def constructed():
    """A target whose delta the candidate GOOD matches and the neighbour BAD opposes."""
    rng = np.random.default_rng(0)
    truth = rng.normal(size=200)
    deltas = {
        "T": truth,  # the target's own training delta
        "NEAR": truth + rng.normal(scale=1.0, size=200),
        "BAD": -truth + rng.normal(scale=0.5, size=200),
        "GOOD": truth + rng.normal(scale=0.3, size=200),
        "NOISE": rng.normal(size=200),
    }
    table = DeltaTable.from_rows(
        [{"dataset": "toy", "context": "ctx", "perturbation": k, "delta": v} for k, v in deltas.items()]
    )
    row = {
        "task": "neighbourhood",
        "dataset": "toy",
        "context": "ctx",
        "condition": "T",
        "neighbours": ["NEAR", "BAD"],
        "candidates": ["GOOD", "NOISE"],
    }
    return table, row


def test_rewards_separate_good_from_bad_edits(constructed) -> None:
    table, row = constructed
    gain = NeighbourhoodGain(table=table)
    validity = NeighbourhoodValidity()
    fmt = NeighbourhoodFormat()
    good, bad = _c("add: GOOD; remove: BAD"), _c("add: NOISE; remove: NEAR")
    completions = [good, bad, _c("add: none; remove: none"), _c("add: GHOST; remove: GOOD"), "garbage"]
    cols = _columns([row] * len(completions))
    g = gain(prompts=None, completions=completions, **cols)
    assert g[0] > 0.5 and g[1] < -0.5, g  # good edit up, bad edit down
    assert g[2] == 0.0 and g[3] == 0.0 and g[4] == 0.0  # no (valid) change: no gain
    assert all(-1.0 <= v <= 1.0 for v in g)
    raw = gain.last_gains
    assert raw[0] > 0 > raw[1]
    assert g[0] == pytest.approx(min(1.0, raw[0] / 0.1))
    v = validity(prompts=None, completions=completions, **cols)
    assert v == [1.0, 1.0, EMPTY_EDIT_PENALTY, 0.0, NO_EDIT_SCORE]
    assert fmt(prompts=None, completions=completions, **cols) == [1.0, 1.0, 1.0, 1.0, 0.0]
    # rows of other tasks are not scored; a target without a training delta (held out) is not scored
    other = {**row, "task": "perturbation"}
    held_out = {**row, "condition": "UNSEEN"}
    for reward in (gain, validity, fmt):
        assert reward(prompts=None, completions=[good], **_columns([other])) == [None]
    assert gain(prompts=None, completions=[good], **_columns([held_out])) == [None]


def test_gain_math_and_empty_set(constructed) -> None:
    table, row = constructed
    cd = table.get("toy", "ctx")
    truth = cd.delta("T")
    # an empty final set predicts the mean of all training perturbations but the target
    expected = (
        np.corrcoef(cd.mean_all(exclude="T"), truth)[0, 1]
        - np.corrcoef(cd.mean_of(["NEAR", "BAD"]), truth)[0, 1]
    )
    assert edit_gain([], ["NEAR", "BAD"], "T", truth, cd) == pytest.approx(expected)
    assert edit_gain(["NEAR", "BAD"], ["NEAR", "BAD"], "T", truth, cd) == 0.0
    gain = NeighbourhoodGain(table=table, scale=0.5, clip=0.2)
    assert gain.scaled(0.05) == pytest.approx(0.1) and gain.scaled(3.0) == 0.2 and gain.scaled(-3.0) == -0.2
    adds, removes = greedy_edit(row["neighbours"], row["candidates"], "T", truth, cd)
    assert "GOOD" in adds and "BAD" in removes and "NOISE" not in adds


def test_registry_and_reward_modes(constructed) -> None:
    assert {"neighbourhood_format", "neighbourhood_validity", "neighbourhood_gain"} <= set(REWARDS)
    # the gain reads observed (training) deltas: a label; format and validity read the prompt only
    assert "neighbourhood_gain" in USES_LABELS
    assert not {"neighbourhood_format", "neighbourhood_validity"} & USES_LABELS
    check_reward_mode("self_supervised", ["format", "neighbourhood_format", "neighbourhood_validity"])
    with pytest.raises(ValueError, match="uses no labels"):
        check_reward_mode("self_supervised", ["neighbourhood_format", "neighbourhood_gain"])
    check_reward_mode("oracle", ["neighbourhood_format", "neighbourhood_validity", "neighbourhood_gain"])
    with pytest.raises(ValueError, match="prepared data"):
        build_rewards(["neighbourhood_gain"], RewardContext())  # no data: nothing to compare with

    class Prepared:
        def __init__(self, rows: list[dict]) -> None:
            self.tables = {DELTA_TABLE: rows} if rows else {}

    with pytest.raises(ValueError, match="delta"):  # data prepared without the neighbourhood task
        build_rewards(["neighbourhood_gain"], RewardContext(prepared=Prepared([])))
    row = {"dataset": "toy", "context": "ctx", "perturbation": "T", "delta": [1.0, 2.0, 3.0]}
    (gain,) = build_rewards(["neighbourhood_gain"], RewardContext(prepared=Prepared([row])))
    assert isinstance(gain, NeighbourhoodGain) and gain.table.get("toy", "ctx").names == ["T"]


def test_cap_neighbours() -> None:
    rng = np.random.default_rng(0)
    shown, cut = cap_neighbours({"A": 0.2, "B": 0.9, "C": math.inf, "D": 0.5}, 2, rng)
    assert shown == ["C", "B"] and cut == ["D", "A"]  # heaviest first, a shared target first of all
    names = dict.fromkeys([f"G{i}" for i in range(30)])
    a, _ = cap_neighbours(names, 5, np.random.default_rng(1))
    b, _ = cap_neighbours(names, 5, np.random.default_rng(1))
    c, _ = cap_neighbours(names, 5, np.random.default_rng(2))
    assert a == b and len(a) == 5 and a != c  # seeded without weights


# ------------------------------------------------------------------------------------------ building


@pytest.fixture(scope="module")
def prepared(norman):
    return build_tasks(
        norman, ["perturbation", "neighbourhood"], split="ood", config=TaskConfig(top_k=16, max_examples=30)
    )


def _nb(ds):
    return [r for r in ds if r["task"] == "neighbourhood"]


def test_neighbourhood_rows(prepared) -> None:
    holdout = set(prepared.meta["split"]["neighbourhood"]["holdout"])
    assert holdout == set(prepared.meta["split"]["perturbation"]["holdout"])
    train, test = _nb(prepared.datasets["train"]), _nb(prepared.datasets["test"])
    assert train and test
    contexts = {r["context"] for r in train}
    # CRISPRa K562 and the McFaline-Figueroa CRISPRi lines are all there
    assert {"cell type: k562", "cell type: A172", "cell type: T98G", "cell type: U87MG"} <= contexts
    table = prepared.tables[DELTA_TABLE]
    measured = {(c, p) for c, p in zip(table["context"], table["perturbation"], strict=True)}
    assert not holdout & {p for _, p in measured}  # training deltas only
    assert {r["condition"] for r in test} <= holdout and not {r["condition"] for r in train} & holdout
    for row in train + test:
        target, nb, cand = row["condition"], row["neighbours"], row["candidates"]
        assert target not in nb and target not in cand and not set(nb) & set(cand)
        assert len(nb) <= 20 and len(cand) <= 50
        assert all((row["context"], p) in measured for p in [*nb, *cand])
        text = row["prompt"][1]["content"]
        assert row["condition_text"] in text and "add:" in text and "remove:" in text
        assert all(p in text for p in nb + cand)
        assert ("CRISPRa" in row["condition_text"]) == (row["context"] == "cell type: k562")
    assert all(parse_edit(_c(r["answer"])) is not None for r in train)
    assert all(r["answer"] == "" for r in test)  # no label computed from held-out cells
    assert len(table[0]["delta"]) == len(prepared.genes)


def test_neighbours_follow_go_rule(norman, prepared) -> None:
    """Uncapped neighbourhoods are the GO graph-neighbour baseline's neighbours (one rule, reused)."""
    from cellduality.metrics.baselines import GONeighbourBaseline

    rows = [r for r in _nb(prepared.datasets["train"]) if r["context"] == "cell type: A172"]
    table = prepared.tables[DELTA_TABLE]
    names = sorted(
        p for c, p in zip(table["context"], table["perturbation"], strict=True) if c == "cell type: A172"
    )
    go = GONeighbourBaseline().fit(np.zeros((len(names) + 1, 1)), [*names, "control"])  # the rule only
    for row in rows:
        assert sorted(row["neighbours"]) == sorted(go.neighbours(row["condition"]))


def test_cap_and_determinism(norman) -> None:
    cfg = TaskConfig(top_k=16, max_neighbours=3, max_additions=4)
    a = build_tasks(norman, ["neighbourhood"], split="ood", config=cfg).datasets["train"]
    b = build_tasks(norman, ["neighbourhood"], split="ood", config=cfg).datasets["train"]
    assert (
        a["neighbours"] == b["neighbours"]
        and a["prompt"] == b["prompt"]
        and a["candidates"] == b["candidates"]
    )
    assert max(len(n) for n in a["neighbours"]) == 3 and max(len(c) for c in a["candidates"]) == 4


def test_refusals(norman) -> None:
    with pytest.raises(DataError, match="--split ood"):
        build_tasks(norman, ["neighbourhood"], split="id", config=CFG)
    with pytest.raises(DataError, match="genetic"):
        build_tasks(load_dataset("glioblastoma_panobinostat"), ["neighbourhood"], split="ood", config=CFG)
    # opt-in: the default task list of a genetic screen is unchanged
    assert norman.columns.supported_tasks() == ["perturbation"]


def test_edge_list_graph(norman, tmp_path) -> None:
    path = tmp_path / "string.tsv.gz"
    lines = ["#node1\tnode2\tcombined_score", "MAP2K3\tMAP2K6\t900", "MAP2K3\tSGK1\t400", "MAP2K3\tPLK4\t150"]
    lines += ["MAPK1\tMAP2K6\t990", "NOTAGENE_X\tMAP2K3\t800"]
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    graph = read_edge_list(path)
    assert graph.weighted and graph.weight("MAP2K6", "MAP2K3") == 900 and graph.n_edges == 5
    assert read_edge_list(path, min_weight=500).weight("MAP2K3", "SGK1") is None
    cfg = TaskConfig(top_k=16, graph=str(path), max_neighbours=2)
    built = build_tasks(norman, ["neighbourhood"], split="ood", config=cfg, holdout=["MAP2K3"])
    a172 = next(r for r in built.datasets["test"] if r["context"] == "cell type: A172")
    assert a172["condition"] == "MAP2K3"
    assert a172["neighbours"] == ["MAP2K6", "SGK1"]  # heaviest two edges first, PLK4 cut
    assert "PLK4" in a172["candidates"] and "string.tsv.gz" in a172["prompt"][1]["content"]
    assert built.meta["split"]["neighbourhood"]["graph"] == "string.tsv.gz"
    # unweighted, comma-separated, Ensembl IDs mapped; STRING protein IDs are refused with advice
    plain = tmp_path / "edges.csv"
    plain.write_text("ENSG00000034152,ENSG00000108984\n")  # MAP2K3, MAP2K6
    g = read_edge_list(plain)
    assert not g.weighted and g.weight("MAP2K3", "MAP2K6") == 1.0
    proteins = tmp_path / "links.txt"
    proteins.write_text("protein1 protein2 combined_score\n9606.ENSP00000000233 9606.ENSP00000272298 490\n")
    with pytest.raises(DataError, match=r"protein\.info"):
        read_edge_list(proteins)


def test_prepare_cli_and_reload(tmp_path, capsys) -> None:
    from cellduality.cli import main

    out = tmp_path / "nb"
    args = ["prepare", "--dataset", "norman_devel", "--tasks", "neighbourhood", "--split", "ood"]
    assert main([*args, "--out", str(out), "--top-k", "16"]) == 0
    loaded = load_prepared(out)
    assert set(loaded.datasets["train"]["task"]) == {"neighbourhood"}
    assert len(loaded.tables[DELTA_TABLE]) > 0
    assert (
        main(
            ["prepare", "--dataset", "norman_devel", "--tasks", "neighbourhood", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "--split ood" in capsys.readouterr().err
    # a folder prepared before the neighbours column existed still loads (the column is added, empty)
    old = loaded.datasets.remove_columns("neighbours")
    from cellduality.tasks import PreparedTasks

    save_prepared(PreparedTasks(old, loaded.meta), tmp_path / "old")
    assert load_prepared(tmp_path / "old").datasets["train"]["neighbours"][0] == []
    meta = json.loads((out / "meta.json").read_text())
    assert meta["config"]["max_neighbours"] == 20 and meta["split"]["neighbourhood"]["mode"] == "ood"


# ------------------------------------------------------------------------------------------ no dual


def test_dual_code_skips_the_task(prepared) -> None:
    row = _nb(prepared.datasets["train"])[0]
    pert = next(r for r in prepared.datasets["train"] if r["task"] == "perturbation")
    assert not has_dual("neighbourhood") and has_dual("perturbation")
    assert forward_answer(row, _c("add: none; remove: none")) is None
    assert dual_prompt(row, "anything") is None
    calls: list[int] = []
    dual = DualReward(generate=lambda ps: calls.append(len(ps)) or ["<answer>control</answer>" for _ in ps])
    scores = dual(
        prompts=None,
        completions=[_c(row["answer"]), _c(pert["answer"])],
        **_columns([row, pert]),
    )
    assert scores[0] is None and isinstance(scores[1], float)
    assert calls == [1]  # one generation call, the perturbation row's dual only


def test_sft_data_for_the_task(prepared, tmp_path) -> None:
    """Offline-teacher SFT data: forward examples of the task, no dual example, nothing failed."""
    from cellduality.teacher.pipeline import GenerationConfig, load_sft_dataset, run_generation

    folder = save_prepared(prepared, tmp_path / "prepared")
    summary = run_generation(
        GenerationConfig(
            data=str(folder),
            out=tmp_path / "sft",
            tasks=["neighbourhood"],
            progress=False,
            offline_concise=True,
        )
    )
    entry = summary["tasks"]["neighbourhood"]
    assert set(entry) == {"forward"} and entry["forward"]["kept"] > 0
    assert summary["totals"]["failed"] == 0 and summary["complete"]
    ds = load_sft_dataset(tmp_path / "sft")["train"]
    assert set(ds["kind"]) == {"forward"}
    for completion in ds["completion"]:
        edit = parse_edit(completion)
        assert edit is not None and not edit.empty


def test_teacher_filter_judges_edits(prepared) -> None:
    from cellduality.teacher.filters import EMPTY_EDIT, INVALID_EDIT, judge

    row = next(r for r in _nb(prepared.datasets["train"]) if r["neighbours"] and r["candidates"])
    ok = judge(row, "forward", f"<think>x</think><answer>add: {row['candidates'][0]}; remove: none</answer>")
    assert ok.kept and ok.score == 1.0
    assert (
        judge(row, "forward", "<think>x</think><answer>add: none; remove: none</answer>").reason == EMPTY_EDIT
    )
    bad = judge(row, "forward", "<think>x</think><answer>add: NOT_A_PERTURBATION; remove: none</answer>")
    assert bad.reason == INVALID_EDIT
    from cellduality.teacher.prompts import teacher_messages

    messages = teacher_messages(row["prompt"], "neighbourhood", "forward")
    assert "add: ...; remove: ..." in messages[0]["content"] and messages[1] == row["prompt"][1]
    with pytest.raises(ValueError, match="no teacher question"):
        teacher_messages(row["prompt"], "neighbourhood", "dual")


# ------------------------------------------------------------------------------------------ evaluation


class Scripted:
    name = "scripted"

    def __init__(self, answer) -> None:
        self.answer = answer

    def generate(self, prompts, settings):
        return [self.answer(m) for m in prompts]


def _neighbours_of(messages) -> list[str]:
    text = messages[-1]["content"]
    for marker in (
        "were perturbed in training: ",
        "graph neighbours measured in training: ",
        "measured in training: ",
    ):
        if marker in text:
            part = text.split(marker, 1)[1].split(". ", 1)[0]
            return [] if part.startswith("none") else part.split(", ")
    return []


def test_eval_edited_vs_unedited(prepared, norman, tmp_path) -> None:
    from cellduality.eval.runner import EvalConfig, run_eval
    from cellduality.inference.generate import ModelSpec
    from cellduality.tasks.real_data import RealData

    models = {
        "keep": lambda m: "<think>x</think><answer>add: none; remove: none</answer>",
        "drop all": lambda m: (
            "<think>x</think><answer>add: none; remove: "
            + (", ".join(_neighbours_of(m)) or "none")
            + "</answer>"
        ),
        "invalid": lambda m: "<think>x</think><answer>add: NOT_A_PERTURBATION; remove: none</answer>",
    }
    specs = [ModelSpec(path=str(tmp_path / name.replace(" ", "_")), name=name) for name in models]
    for spec in specs:
        (tmp_path / spec.name.replace(" ", "_")).mkdir()
    by_path = {str(tmp_path / n.replace(" ", "_")): Scripted(f) for n, f in models.items()}
    config = EvalConfig(
        out_dir=tmp_path / "eval", models=specs, tasks=["neighbourhood"], plots=False, progress=False
    )
    result = run_eval(
        prepared,
        config,
        real=RealData(norman, prepared.meta),
        backend_factory=lambda spec, settings: by_path[spec.path],
    )
    task = result.tasks["neighbourhood"]
    by = {s.name: s for s in task.methods}
    assert {
        "graph neighbourhood, unedited",
        "control mean",
        "mean perturbation",
        "GO graph neighbour",
    } <= set(by)
    assert by["split-half reproducibility"].kind == "reference"  # the split-half row, as for perturbation
    unedited = by["graph neighbourhood, unedited"].metrics
    # no edit: exactly the unedited predictor; every neighbour removed: the mean of all training deltas
    assert by["keep"].metrics["pearson_delta"] == pytest.approx(unedited["pearson_delta"])
    assert (
        by["keep"].metrics["gain_vs_unedited"] == pytest.approx(0.0)
        and by["keep"].metrics["empty_edit_rate"] == 1.0
    )
    assert by["drop all"].metrics["pearson_delta"] == pytest.approx(
        by["mean perturbation"].metrics["pearson_delta"]
    )
    assert by["drop all"].metrics["valid_edit_fraction"] == 1.0
    assert by["invalid"].metrics["valid_edit_fraction"] == 0.0
    assert by["invalid"].metrics["pearson_delta"] == pytest.approx(unedited["pearson_delta"])
    for key in ("pearson_delta_de", "retrieval"):
        assert all(key in s.metrics for s in task.methods if s.kind in ("model", "baseline"))
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "Knowledge-graph neighbourhood editing" in report and "valid edits" in report
    assert "graph neighbourhood, unedited" in report and "split-half reproducibility" in report
