"""The paper's data design: a small labelled SFT set and a disjoint unlabelled RL pool per task.

Properties: the pools are disjoint and sized as asked; everything fitted on labels sees the SFT set
only; an RL-pool prompt carries no label of its own (permuting the pool's labels leaves every RL row
as it was and changes only what the oracle reads); the block-wise prepare writes the same rows.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from cellduality.data.schema import DataError
from cellduality.tasks import TaskConfig, build_tasks
from cellduality.tasks.plan import REFERENCE_TABLE, RL_SPLIT, divide_training, plan_tasks

CFG = TaskConfig(top_k=16, max_examples=200, seed=0, sft_examples=40, rl_examples=120)


@pytest.fixture(scope="module")
def pbmc_design(pbmc):
    return build_tasks(pbmc, config=CFG)


def _rl_cells(data, task: str, cfg: TaskConfig) -> np.ndarray:
    """Positions into ``data.adata.obs`` of the task's RL-pool cells (prompts and reference)."""
    plan = plan_tasks(data, [task], config=cfg)
    p = plan.plans[0]
    return p.positions[np.union1d(p.cells[RL_SPLIT], p.reference)]


def test_pools_are_disjoint_and_sized(pbmc, pbmc_design) -> None:
    plan = plan_tasks(pbmc, ["annotation", "generation"], config=CFG)
    for p in plan.plans:
        sft, rl, test = (set(p.obs.index[p.cells[s]]) for s in ("train", RL_SPLIT, "test"))
        reference = set(p.obs.index[p.reference])
        assert len(sft) == CFG.sft_examples
        assert len(rl) == CFG.rl_examples
        assert not sft & rl and not sft & test and not rl & test and not sft & reference
        assert rl <= reference  # the prompts are a sample of the pool
    # annotation and generation share one division: no RL-pool cell is an SFT answer of the other task
    a, g = plan.plans
    assert set(a.obs.index[a.cells["train"]]) == set(g.obs.index[g.cells["train"]])
    summary = {(s["task"], s["split"]): s["rows"] for s in pbmc_design.meta["summary"]}
    assert summary[("annotation", "train")] == 40 and summary[("annotation", RL_SPLIT)] == 120
    assert pbmc_design.meta["split"]["annotation"]["rl_pool"] == 120


def test_candidates_and_labels_come_from_the_sft_set(pbmc_design) -> None:
    train, rl = pbmc_design.datasets["train"], pbmc_design.datasets[RL_SPLIT]
    sft_types = set(train.filter(lambda r: r["task"] == "annotation")["answer"])
    for row in rl:
        assert set(row["candidates"]) <= sft_types  # never the pool cell's own type added
        if row["task"] == "generation":
            assert row["answer"] == "" and row["cell_id"] == "" and row["condition"] in sft_types
    labels = pbmc_design.meta["labels"]
    assert set(labels["annotation"]) <= sft_types if isinstance(labels.get("annotation"), list) else True


def test_no_rl_pool_without_sft_examples(pbmc) -> None:
    prepared = build_tasks(pbmc, config=TaskConfig(top_k=16, max_examples=50, seed=0))
    assert set(prepared.datasets) == {"train", "test"} and REFERENCE_TABLE not in prepared.tables
    with pytest.raises(DataError, match="--sft-examples"):
        TaskConfig(rl_examples=5)
    with pytest.raises(DataError, match="RL pool"):  # an SFT set as large as the training split
        build_tasks(pbmc, ["annotation"], config=TaskConfig(top_k=16, seed=0, sft_examples=10_000))


def _permuted(data, column: str, cells: np.ndarray, seed: int = 1):
    """``data`` with the values of ``column`` permuted among ``cells`` (the RL pool's labels)."""
    other = copy.deepcopy(data)
    obs = other.adata.obs
    values = obs[column].astype(str).to_numpy().copy()
    values[cells] = values[np.random.default_rng(seed).permutation(cells)]
    obs[column] = values
    return other


def _rows(ds) -> list[dict]:
    return ds.to_list()


@pytest.mark.parametrize("column,tasks", [("bulk_labels", ["annotation", "generation"])])
def test_permuting_the_pools_labels_changes_only_what_the_oracle_reads(pbmc, column, tasks) -> None:
    cfg = TaskConfig(top_k=16, max_examples=120, seed=0, sft_examples=40, rl_examples=80)
    cells = _rl_cells(pbmc, "annotation", cfg)
    other = _permuted(pbmc, column, cells)
    assert (other.adata.obs[column].astype(str) != pbmc.adata.obs[column].astype(str)).any()
    a, b = build_tasks(pbmc, tasks, config=cfg), build_tasks(other, tasks, config=cfg)
    assert _rows(a.datasets["train"]) == _rows(b.datasets["train"])  # the SFT set
    assert _rows(a.datasets["test"]) == _rows(b.datasets["test"])
    label_free = [c for c in a.datasets[RL_SPLIT].column_names if c not in ("answer", "cell_id")]
    assert _rows(a.datasets[RL_SPLIT].select_columns(label_free)) == _rows(
        b.datasets[RL_SPLIT].select_columns(label_free)
    )
    assert a.datasets[RL_SPLIT]["answer"] != b.datasets[RL_SPLIT]["answer"]  # what the oracle reads
    assert a.tables[REFERENCE_TABLE]["condition"] != b.tables[REFERENCE_TABLE]["condition"]
    assert a.meta["labels"] == b.meta["labels"]


def test_perturbation_pool_prompts_are_control_cells(norman) -> None:
    cfg = TaskConfig(top_k=16, max_examples=100, seed=0, sft_examples=60, rl_examples=50)
    prepared = build_tasks(norman, ["perturbation"], config=cfg)
    rl, train = prepared.datasets[RL_SPLIT], prepared.datasets["train"]
    sft_perturbations = set(train["condition"])
    assert len(train) == 60
    assert all(r["answer"] == "" and r["cell_id"] == "" for r in rl)
    assert set(rl["condition"]) <= sft_perturbations
    # a perturbation the SFT set has in a context is asked of every pool control of that context
    assert len(rl) >= 50
    reference = prepared.tables[REFERENCE_TABLE]
    sft_ids, pool_ids = set(train["cell_id"]), set(reference["cell_id"])
    assert pool_ids and not sft_ids & pool_ids
    # permuting the pool's perturbed cells' labels: the same prompts, another reference
    plan = plan_tasks(norman, ["perturbation"], config=cfg).plans[0]
    cells = plan.positions[plan.reference]
    other = build_tasks(_permuted(norman, norman.columns.perturbation, cells), ["perturbation"], config=cfg)
    assert _rows(other.datasets[RL_SPLIT]) == _rows(rl)
    assert _rows(other.datasets["train"]) == _rows(train)
    assert other.tables[REFERENCE_TABLE]["condition"] != reference["condition"]


def test_division_reads_no_label(pbmc) -> None:
    """The SFT set is the same whatever the labels say (a relabelled dataset divides the same cells)."""
    obs = pbmc.adata.obs
    train = np.arange(500)
    sft, rl, _ = divide_training("annotation", obs, pbmc.columns, train, CFG)
    relabelled = obs.copy()
    relabelled[pbmc.columns.cell_type] = "x"
    again = divide_training("annotation", relabelled, pbmc.columns, train, CFG)
    assert np.array_equal(sft, again[0]) and np.array_equal(rl, again[1])


def test_blockwise_prepare_writes_the_same_pools(pbmc_file, tmp_path) -> None:
    from cellduality.data import load_dataset
    from cellduality.data.schema import Columns
    from cellduality.tasks import load_prepared
    from cellduality.tasks.blockwise import prepare_blockwise

    cfg = TaskConfig(top_k=16, max_examples=100, seed=0, sft_examples=30, rl_examples=60)
    columns = Columns(cell_type="bulk_labels")
    prepare_blockwise(pbmc_file, columns, tmp_path / "b", config=cfg, progress=False, block_cells=200)
    blockwise = load_prepared(tmp_path / "b")
    memory = build_tasks(load_dataset(str(pbmc_file), columns), config=cfg)
    for split in ("train", RL_SPLIT, "test"):
        assert _rows(blockwise.datasets[split]) == _rows(memory.datasets[split]), split
    assert blockwise.tables[REFERENCE_TABLE].to_list() == memory.tables[REFERENCE_TABLE].to_list()


@pytest.mark.slow
def test_permuting_the_pools_labels_leaves_the_label_free_checkpoints_byte_identical(pbmc, tmp_path) -> None:
    """The contract's property, end to end on real training: permute the RL pool's labels, and the SFT
    data, the SFT checkpoint and the dual GRPO checkpoint are byte for byte what they were (same seed);
    the oracle arm reads the permuted labels (its rewards on the same completions differ)."""
    from cellduality import stages
    from cellduality.ablation import TINY
    from cellduality.rewards import RewardContext, build_rewards
    from cellduality.tasks import load_prepared, save_prepared
    from cellduality.teacher.pipeline import load_sft_dataset

    plan = TINY.replace("grpo_dual", max_steps=3).replace("sft", num_train_epochs=1)
    cfg = TaskConfig(
        top_k=plan.fields("prepare")["top_k"], max_examples=40, seed=0, sft_examples=16, rl_examples=12
    )
    tasks = ["annotation", "generation"]
    other = _permuted(pbmc, "bulk_labels", _rl_cells(pbmc, "annotation", cfg))
    runs = {}
    for name, data in (("original", pbmc), ("permuted", other)):
        out = tmp_path / name
        folder = save_prepared(build_tasks(data, tasks, config=cfg), out / "prepared" / "pbmc68k")
        stages.sft(plan, out, [folder], 0)
        stages.grpo(plan, out, [folder], 0, arm="dual", name="grpo")
        # the ablation's dual arm: the SFT checkpoint, frozen, reads annotation's in-painting dual
        frozen = plan.replace("grpo_dual", dual_frozen_tasks=["annotation"])
        stages.grpo(frozen, out, [folder], 0, arm="dual", name="grpo_frozen")
        runs[name] = (out, folder)
    (a, fa), (b, fb) = runs["original"], runs["permuted"]
    assert (
        load_sft_dataset(a / "sft_data")["train"].to_list()
        == load_sft_dataset(b / "sft_data")["train"].to_list()
    )
    for stage in ("sft", "grpo", "grpo_frozen"):
        assert (a / stage / "model.safetensors").read_bytes() == (
            b / stage / "model.safetensors"
        ).read_bytes(), stage
    # the oracle reads the pool's labels: the same completions (the original pool's true answers) score
    # differently against the permuted pool
    pa, pb = load_prepared(fa), load_prepared(fb)
    rows = pa.datasets[RL_SPLIT].filter(lambda r: r["task"] == "annotation")
    completions = [
        [{"role": "assistant", "content": f"<think>x</think><answer>{r['answer']}</answer>"}] for r in rows
    ]
    scores = {}
    for key, prepared in (("original", pa), ("permuted", pb)):
        (oracle,) = build_rewards(["oracle_eval"], RewardContext.for_data(prepared))
        columns = prepared.datasets[RL_SPLIT].filter(lambda r: r["task"] == "annotation").to_dict()
        scores[key] = oracle(completions=completions, **columns)
    # right wherever the pool cell's type is a candidate (the SFT set's types: a pool cell of a type the SFT
    # set lacks cannot be answered), and changed by the permutation
    assert scores["original"] == [float(r["answer"] in r["candidates"]) for r in rows]
    assert scores["permuted"] != scores["original"]


def _completion(answer: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"<think>x</think><answer>{answer}</answer>"}]


def _score(prepared, rows: list[dict], answers: list[str]) -> list[float | None]:
    from cellduality.rewards import RewardContext, build_rewards

    (oracle,) = build_rewards(["oracle_eval"], RewardContext.for_data(prepared))
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    return oracle(completions=[_completion(a) for a in answers], **columns)


def test_oracle_eval_scores_what_eval_scores(pbmc_design) -> None:
    """Hand-made answers: a real cell of the prompted type scores high, of another type low; a label is
    1/0; an answer too short to be a cell scores lowest."""
    rl = pbmc_design.datasets[RL_SPLIT]
    annotation = [r for r in rl if r["task"] == "annotation" and r["answer"] in r["candidates"]][:2]
    wrong = next(c for c in annotation[0]["candidates"] if c != annotation[0]["answer"])
    assert _score(pbmc_design, [annotation[0]] * 3, [annotation[0]["answer"], wrong, "no answer"]) == [
        1.0,
        0.0,
        0.0,
    ]
    # generation: the test cells of a type (real cells the oracle never saw) against the pool's real cells
    test = pbmc_design.datasets["test"].filter(lambda r: r["task"] == "generation")
    counts = {c: test["condition"].count(c) for c in set(test["condition"])}
    prompt = max((r for r in rl if r["task"] == "generation"), key=lambda r: counts.get(r["condition"], 0))
    wanted = prompt["condition"]
    own = [r["answer"] for r in test if r["condition"] == wanted][:10]
    other = [r["answer"] for r in test if r["condition"] != wanted][:10]
    mine = _score(pbmc_design, [prompt] * len(own), own)
    theirs = _score(pbmc_design, [prompt] * len(other), other)
    assert np.mean(mine) > np.mean(theirs) + 0.3, (mine, theirs)
    short = " ".join(own[0].split()[:3])  # 3 of 16 genes: not a cell
    assert _score(pbmc_design, [prompt], [short]) == [0.0]


def test_oracle_eval_perturbation_against_the_pools_change() -> None:
    from cellduality.data import load_dataset

    cfg = TaskConfig(top_k=16, max_examples=200, seed=0, sft_examples=60, rl_examples=40)
    prepared = build_tasks(load_dataset("glioblastoma_panobinostat"), config=cfg)
    rl = prepared.datasets[RL_SPLIT]
    test = prepared.datasets["test"]
    rows, perturbed, control = [], [], []
    for prompt in rl:  # pair each pool prompt with a real perturbed test cell of its context
        match = [r for r in test if r["context"] == prompt["context"]]
        if match:
            rows.append(prompt)
            perturbed.append(match[0]["answer"])
            control.append(" ".join(prompt["cell_genes"]))
        if len(rows) == 20:
            break
    real = _score(prepared, rows, perturbed)
    unchanged = _score(prepared, rows, control)
    assert np.mean(real) > np.mean(unchanged) + 0.2, (np.mean(real), np.mean(unchanged))
    # genes of another dataset parse to nothing here: the lowest reward, as eval finds them invalid
    foreign = " ".join(["CD74", "HLA-DRA", "LYZ", "S100A8", "CD3E", "MS4A1", "NKG7", "GNLY"] * 2)
    assert _score(prepared, rows[:1], [foreign]) == [-1.0]


def test_rewards_parse_a_row_with_its_own_datasets_genes() -> None:
    """A run on several datasets: an answer naming another dataset's genes is no cell of this one (eval
    parses per dataset); with the union alone it counted as parsed (the measured oracle hack)."""
    from cellduality.rewards import RewardContext, build_rewards

    union = {g.casefold(): g for g in ("CD74", "LYZ", "VIM", "CLU")}
    own = {"glio": {"vim": "VIM", "clu": "CLU"}, "pbmc": {"cd74": "CD74", "lyz": "LYZ"}}
    logged: dict[str, float] = {}
    row = {"task": "perturbation", "dataset": "glio", "n_genes": [2], "id": ["a"]}
    for vocabularies, expected in ((None, 1.0), (own, 0.0)):
        (fmt,) = build_rewards(["format"], RewardContext(vocabulary=union, vocabularies=vocabularies))
        fmt(
            completions=[_completion("CD74 LYZ")],
            task=[row["task"]],
            dataset=[row["dataset"]],
            n_genes=row["n_genes"],
            id=row["id"],
            log_metric=logged.__setitem__,
        )
        assert logged["format/perturbation/parsed"] == expected
