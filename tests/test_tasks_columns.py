"""The column-wise example builders give today's rows, draw for draw.

Each example is seeded by its own ``example_rng``; the builders take those draws for a whole chunk
from ``cellduality.tasks.draws`` (numpy's SeedSequence, PCG64 and Generator methods, compiled) and
assemble Arrow columns. Checked here: every draw against ``numpy.random.Generator``; every builder
against the per-example functions (``annotation_example``, ``generation_example``,
``perturbation_example``, which ``predict`` uses) or, where a task has none, against the row-by-row
loop the builders replaced (kept below as the reference); and the rows of every embedded dataset
against digests recorded before the builders were rewritten.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest

from cellduality.data import EMBEDDED, load_dataset
from cellduality.data.schema import RESISTANT, SENSITIVE
from cellduality.sentences import GenePresence, cell_sentences
from cellduality.tasks import TaskConfig, build_tasks
from cellduality.tasks import draws as d
from cellduality.tasks.classification import (
    annotation_example,
    annotation_rows,
    context_texts,
    drug_sensitivity_rows,
    response_labels,
)
from cellduality.tasks.common import (
    example_rng,
    hide_genes,
    join_genes,
    messages,
    opaque_id,
    opaque_ids,
    pick,
    presence_scores,
    record,
    shuffled,
)
from cellduality.tasks.generative import (
    generation_example,
    generation_prompts,
    generation_rows,
    perturbation_candidates,
    perturbation_example,
    perturbation_plan,
    perturbation_text,
)
from cellduality.tasks.output import LabelCollector, SummaryCounter, rows_table
from cellduality.tasks.templates import DRUG_SENSITIVITY, PERTURBATION

# ------------------------------------------------------------------------------------------ draws


@pytest.mark.parametrize("seed", [0, 3, 2**40 + 17])
@pytest.mark.parametrize("rule", ["informative", "random"])
def test_every_draw_is_numpys(seed: int, rule: str) -> None:
    rng0 = np.random.default_rng(seed % 1000)
    n = 300
    keys = [f"ds/task/train/cell{i}" for i in range(n)]
    lengths = rng0.integers(0, 30, n)
    genes = rng0.integers(0, 50, (n, 30))
    scores = rng0.random(50).round(2)  # ties between scores: the jitter decides
    n_hidden = np.array([min(k - 1, max(1, round(k * 0.25))) if k >= 2 else 0 for k in lengths])
    perm_m = rng0.integers(1, 15, n)
    bound = rng0.integers(1, 3000, n)
    pops = rng0.integers(0, 40, n)
    pops[:3] = 20_000  # numpy's tail-shuffle branch of choice: not compiled, drawn by numpy itself
    size = np.minimum(pops, rng0.integers(0, 5, n))
    size[:3] = [500, 0, 3]
    program = [d.HIDE, d.PERMUTE, d.INTEGER, d.CHOICE, d.INTEGER]
    params = np.stack([lengths, perm_m, bound, pops, np.full(n, 3)], axis=1)
    sizes = np.zeros_like(params)
    sizes[:, 3] = size
    out, hidden = d.run_program(
        seed,
        keys,
        program,
        params,
        sizes,
        genes=genes,
        lengths=lengths,
        scores=scores if rule == "informative" else None,
        n_hidden=n_hidden,
    )
    by_name = {f"g{j}": float(scores[j]) for j in range(50)}
    for e, key in enumerate(keys):
        rng = example_rng(seed, key)
        sentence = [f"g{j}" for j in genes[e, : lengths[e]]]
        _, expected_hidden = hide_genes(rng, sentence, 0.25, by_name if rule == "informative" else None)
        got_hidden = [g for g, h in zip(sentence, hidden[e, : lengths[e]].tolist(), strict=True) if h]
        assert got_hidden == expected_hidden, e
        assert out[1][e, : perm_m[e]].tolist() == rng.permutation(perm_m[e]).tolist(), e
        assert out[2][e, 0] == int(rng.integers(bound[e])), e
        if size[e]:
            assert out[3][e, : size[e]].tolist() == rng.choice(pops[e], size[e], replace=False).tolist(), e
        assert out[4][e, 0] == int(rng.integers(3)), e


def test_seed_words_are_seedsequences() -> None:
    for seed in (0, 1, 2**32 - 1, 2**32, 2**70 + 5):
        words = d.seed_words(seed)
        entropy = np.random.SeedSequence([seed, 7]).entropy
        assert [*words.tolist(), 7] == list(np.random.bit_generator._coerce_to_uint32_array(entropy))


# ------------------------------------------------------------------------------ builders, real data

CFG = TaskConfig(top_k=40, n_genes=30, seed=2)


@pytest.fixture(scope="module")
def pbmc_sentences(pbmc):
    return cell_sentences(pbmc.adata, top_k=max(CFG.top_k, CFG.answer_genes), seed=CFG.seed)


def _scores(sentences, top_k: int) -> dict[str, float]:
    return presence_scores([s[:top_k] for s in sentences])


def test_sentences_are_lists_of_symbols_and_arrow_columns(pbmc, pbmc_sentences) -> None:
    lists = pbmc_sentences.tolist()
    assert pbmc_sentences == lists and len(lists) == pbmc.adata.n_obs
    assert pbmc_sentences.arrow(limit=10).to_pylist() == [s[:10] for s in lists]
    cells = np.array([5, 0, 17])
    assert pbmc_sentences.view(np.arange(3, 40)).arrow(cells).to_pylist() == [lists[c + 3] for c in cells]
    presence = GenePresence(len(pbmc_sentences.names), 25)
    for lo in range(0, len(lists), 97):  # block by block, as the block-wise prepare adds them
        presence.add(lo, pbmc_sentences.genes[lo : lo + 97], pbmc_sentences.counts[lo : lo + 97])
    # the same scores in the same (first-seen) order: meta.json lists them, most_informative breaks ties by it
    assert list(presence.scores(pbmc_sentences.names).items()) == list(_scores(lists, 25).items())


def test_ids_and_seed_words_from_a_shared_prefix_equal_the_whole_key() -> None:
    """``opaque_ids`` (one hash of the prefix, continued per cell) and ``PrefixedKeys`` (a crc32 continued
    from the prefix's) give what hashing each whole string gives, for any id (empty, non-ASCII, long)."""
    ids = ["cell0", "", "AAACCTGAGCATCATC-1", "é|ctrl+KRAS", "x" * 300, "cell0"]
    for seed, dataset, split in [(0, "pbmc68k", "train"), (12345678901, "atlas ü", "rl")]:
        whole = [
            hashlib.blake2b(f"{seed}/{dataset}/annotation/{split}/{c}".encode(), digest_size=6).hexdigest()
            for c in ids
        ]
        assert opaque_ids(seed, dataset, "annotation", split, ids) == [
            f"{dataset}/annotation/{split}/{digest}" for digest in whole
        ]
        assert [opaque_id(seed, dataset, "annotation", split, c) for c in ids] == opaque_ids(
            seed, dataset, "annotation", split, ids
        )
        prefix = f"{dataset}/annotation/{split}/"
        joined = d.key_crcs([prefix + c for c in ids])
        assert np.array_equal(d.key_crcs(d.PrefixedKeys(prefix, ids)), joined)
        assert joined.dtype == np.uint64 and len(set(joined.tolist())) == 5  # the repeated id repeats
    assert opaque_ids(0, "d", "t", "s", []) == [] and d.key_crcs(d.PrefixedKeys("p/", [])).size == 0


@pytest.mark.parametrize(
    ("width", "top_k", "dtype"), [(30, 25, np.int16), (20, 25, np.int32), (25, 25, np.int16)]
)
def test_gene_presence_compiled_loop_equals_numpy(width: int, top_k: int, dtype) -> None:
    """The compiled counting loop gives the numpy version's counts and first positions, for stores wider
    and narrower than top_k and sentences of every length (0 to full, -1 padding past the length)."""
    rng = np.random.default_rng(3)
    n_genes, n_cells = 60, 1_000
    genes = rng.integers(0, n_genes, (n_cells, width)).astype(dtype)
    lengths = rng.integers(0, width + 1, n_cells).astype(np.int32)
    genes[np.arange(width)[None, :] >= lengths[:, None]] = -1
    compiled, numpy = GenePresence(n_genes, top_k), GenePresence(n_genes, top_k)
    for lo in range(0, n_cells, 137):
        compiled.add(lo, genes[lo : lo + 137], lengths[lo : lo + 137])
        numpy._add_numpy(lo, genes[lo : lo + 137], lengths[lo : lo + 137])
    assert compiled.n == numpy.n == n_cells
    assert np.array_equal(compiled.counts, numpy.counts) and compiled.counts.sum() > 0
    assert np.array_equal(compiled.first, numpy.first)
    names = [f"G{j}" for j in range(n_genes)]
    assert list(compiled.scores(names).items()) == list(numpy.scores(names).items())


@pytest.mark.parametrize("closed", [False, True])
@pytest.mark.parametrize("rule", ["informative", "random"])
def test_annotation_rows_are_annotation_examples(pbmc, pbmc_sentences, closed: bool, rule: str) -> None:
    obs = pbmc.adata.obs
    cells = np.arange(0, obs.shape[0], 3)
    pool = ["CD14+ Monocyte", "CD19+ B", "Dendritic"]  # most cells' own type is missing: added unless closed
    scores = _scores(pbmc_sentences, CFG.top_k) if rule == "informative" else None
    table = annotation_rows(
        obs,
        pbmc_sentences,
        cells,
        pbmc.columns,
        "pbmc68k",
        "test",
        CFG,
        pool=pool,
        gene_scores=scores,
        closed=closed,
    )
    labels = obs[pbmc.columns.cell_type].astype(str).tolist()
    rows = table.to_pylist()
    assert len(rows) == cells.size
    for row, i in zip(rows, cells.tolist(), strict=True):
        cell_id = str(obs.index[i])
        own = labels[i]
        candidates = pool if closed or own in pool else sorted([*pool, own])
        expected = annotation_example(
            cell_id,
            pbmc_sentences[i],
            candidates,
            CFG,
            "pbmc68k",
            split="test",
            gene_scores=scores,
            answer=own,
            stored_id=opaque_id(CFG.seed, "pbmc68k", "annotation", "test", cell_id),
        )
        assert row == expected, cell_id


def test_generation_rows_and_rl_prompts_are_generation_examples(pbmc, pbmc_sentences) -> None:
    obs = pbmc.adata.obs
    cells = np.arange(1, obs.shape[0], 4)
    pool = sorted(["CD8+ Cytotoxic T", "CD4+/CD25 T Reg", "CD56+ NK"])
    labels = obs[pbmc.columns.cell_type].astype(str).tolist()
    table = generation_rows(obs, pbmc_sentences, cells, pbmc.columns, "pbmc68k", "train", CFG, pool=pool)
    for row, i in zip(table.to_pylist(), cells.tolist(), strict=True):
        cell_id, own = str(obs.index[i]), labels[i]
        expected = generation_example(
            cell_id,
            own,
            pool if own in pool else sorted([*pool, own]),
            CFG,
            "pbmc68k",
            split="train",
            answer=join_genes(pbmc_sentences[i][: CFG.answer_genes]),
            cell_id=cell_id,
            stored_id=opaque_id(CFG.seed, "pbmc68k", "generation", "train", cell_id),
        )
        assert row == expected, cell_id
    rl = generation_prompts(obs, cells, "pbmc68k", CFG, pool).to_pylist()
    candidates = sorted(pool)
    for row, i in zip(rl, cells.tolist(), strict=True):
        key = opaque_id(CFG.seed, "pbmc68k", "generation", "rl", str(obs.index[i]))
        condition = candidates[int(example_rng(CFG.seed, key).integers(len(candidates)))]
        assert row == generation_example(
            key, condition, candidates, CFG, "pbmc68k", split="rl", stored_id=key
        )


def _drug_reference(obs, sentences, cells, columns, dataset, split, cfg, gene_scores) -> list[dict]:
    """The drug-sensitivity builder as it was, one generator and one dict per example."""
    labels = response_labels(obs, columns).iloc[cells].tolist()
    drugs = obs[columns.drug].astype(str).iloc[cells].tolist()
    ids = obs.index[cells].astype(str).tolist()
    ctx_values = [[str(v) for v in obs[c].iloc[cells].tolist()] for c in columns.context]
    contexts = context_texts(obs, cells, columns.context)
    rows = []
    for k in range(len(ids)):
        cell_id, i = ids[k], int(cells[k])
        rng = example_rng(cfg.seed, f"{dataset}/drug_sensitivity/{split}/{cell_id}")
        sentence = list(sentences[i])[: cfg.top_k]
        visible, hidden = hide_genes(rng, sentence, cfg.hidden_fraction, gene_scores)
        cands = shuffled(rng, [SENSITIVE, RESISTANT])
        prompt = pick(rng, DRUG_SENSITIVITY).format(
            cell=join_genes(sentence),
            drug=drugs[k],
            candidates=" or ".join(cands),
            context="".join(f"{values[k]} " for values in ctx_values),
        )
        rows.append(
            record(
                id=opaque_id(cfg.seed, dataset, "drug_sensitivity", split, cell_id),
                task="drug_sensitivity",
                prompt=messages(prompt),
                answer=labels[k],
                candidates=cands,
                condition=drugs[k],
                condition_text=drugs[k],
                cell_genes=sentence,
                visible_genes=visible,
                hidden_genes=hidden,
                n_genes=len(hidden),
                context=contexts[k],
                cell_id=cell_id,
                dataset=dataset,
            )
        )
    return rows


@pytest.mark.parametrize("rule", ["informative", "random"])
def test_drug_sensitivity_rows_are_the_row_by_row_loop(rule: str) -> None:
    name = "scad_plx4720"
    data = load_dataset(name)
    sentences = cell_sentences(
        data.adata, top_k=CFG.top_k, seed=CFG.seed, allow_scaled=data.value_type != "log-normalised"
    )
    scores = _scores(sentences, CFG.top_k) if rule == "informative" else None
    obs = data.adata.obs
    cells = np.arange(obs.shape[0])
    table = drug_sensitivity_rows(obs, sentences, cells, data.columns, name, "train", CFG, gene_scores=scores)
    assert table.to_pylist() == _drug_reference(
        obs, sentences, cells, data.columns, name, "train", CFG, scores
    )


def _perturbation_reference(plan, obs, sentences, cells, columns, dataset, cfg) -> list[dict]:
    """The perturbation builder as it was, one generator and one dict per example."""
    split, n = plan.split, cfg.answer_genes
    cells = plan.perturbed(cells)
    ids = obs.index[cells].astype(str).tolist()
    directions = obs[columns.direction].iloc[cells].astype(str).tolist() if columns.direction else None
    doses = obs[columns.dose].iloc[cells].astype(str).tolist() if columns.dose else None
    ctx_texts = context_texts(obs, cells, columns.context)
    rows = []
    for k, i in enumerate(cells.tolist()):
        cell_id = ids[k]
        rng = example_rng(cfg.seed, f"{dataset}/perturbation/{split}/{cell_id}")
        ctrl_pool = plan.controls_by_context[plan.contexts[i]]
        ctrl_pool = ctrl_pool if ctrl_pool.size else plan.any_controls
        control = int(ctrl_pool[int(rng.integers(ctrl_pool.size))])
        condition = plan.conditions[i]
        text = perturbation_text(
            condition, columns, directions[k] if directions else None, doses[k] if doses else None
        )
        candidates = perturbation_candidates(
            rng, condition, str(columns.control_value), plan.perturbations_by_context[plan.contexts[i]], cfg
        )
        ctx = ctx_texts[k]
        control_genes = list(sentences[control])[: cfg.top_k]
        prompt = pick(rng, PERTURBATION).format(
            cell=join_genes(control_genes), condition_text=text, n=n, context=f" ({ctx})" if ctx else ""
        )
        rows.append(
            record(
                id=opaque_id(cfg.seed, dataset, "perturbation", split, cell_id),
                task="perturbation",
                prompt=messages(prompt),
                answer=join_genes(list(sentences[i])[:n]),
                candidates=candidates,
                condition=condition,
                condition_text=text,
                cell_genes=control_genes,
                n_genes=n,
                context=ctx,
                cell_id=cell_id,
                dataset=dataset,
            )
        )
    return rows


@pytest.mark.parametrize("max_candidates", [2, 4, 9])
def test_perturbation_rows_and_rl_prompts_are_todays(norman, max_candidates: int) -> None:
    cfg = TaskConfig(top_k=25, n_genes=35, seed=4, max_candidates=max_candidates)
    obs = norman.adata.obs
    sentences = cell_sentences(norman.adata, top_k=35, seed=cfg.seed)
    cells = np.arange(obs.shape[0])
    plan = perturbation_plan(obs, cells[::2], norman.columns, "train", pool=cells[::2])
    got = plan.rows(obs, sentences, cells[::2], norman.columns, "norman", cfg).to_pylist()
    assert got == _perturbation_reference(plan, obs, sentences, cells[::2], norman.columns, "norman", cfg)
    assert len(got) > 100
    rl_cells = cells[1::7]
    rl = plan.rl_rows(obs, sentences, rl_cells, norman.columns, "norman", cfg).to_pylist()
    expected = []
    ids = obs.index.astype(str)
    for i in rl_cells[plan.is_control[rl_cells]].tolist():
        ctx_key = plan.contexts[i]
        for condition in plan.perturbations_by_context[ctx_key]:
            example = plan.pool_cells[(ctx_key, condition)]
            c = norman.columns
            text = perturbation_text(
                condition,
                c,
                str(obs[c.direction].iloc[example]) if c.direction else None,
                str(obs[c.dose].iloc[example]) if c.dose else None,
            )
            expected.append(
                perturbation_example(
                    opaque_id(cfg.seed, "norman", "perturbation", "rl", f"{ids[i]}|{condition}"),
                    sentences[i][: cfg.top_k],
                    condition,
                    text,
                    plan.perturbations_by_context[ctx_key],
                    str(c.control_value),
                    cfg,
                    "norman",
                    context=context_texts(obs, np.array([i]), c.context)[0],
                )
            )
    assert rl == expected and len(rl) > 10


def test_table_summary_and_labels_are_the_rows(pbmc, pbmc_sentences) -> None:
    obs = pbmc.adata.obs
    cells = np.arange(0, obs.shape[0], 5)
    table = pa.concat_tables(
        [
            annotation_rows(obs, pbmc_sentences, cells, pbmc.columns, "pbmc68k", "train", CFG),
            generation_rows(obs, pbmc_sentences, cells, pbmc.columns, "pbmc68k", "train", CFG),
        ]
    )
    rows = table.to_pylist()
    rows[0]["answer"] = " two\u00a0words\u2003and  more\t"  # str.split() splits on every Unicode space
    table = rows_table(rows, build_tasks.__globals__["FEATURES"])
    by_rows, by_table = SummaryCounter(), SummaryCounter()
    by_rows.add("train", rows)
    by_table.add_table("train", table)
    assert by_rows.summary() == by_table.summary()
    a, b = LabelCollector(), LabelCollector()
    a.add(rows)
    b.add_table(table)
    assert a.rows() == b.rows()


# ------------------------------------------------------------------------------ today's rows, pinned

#: sha256 (first 16 hex digits) of every prepared row, and of meta.json, per embedded dataset and
#: configuration, recorded with the row-by-row builders (one generator and one dict per example)
#: before the column-wise ones replaced them. A change here changes every prepared dataset.
PINNED = {
    "glioblastoma_panobinostat/default": ("faadc9972eb730c0", "63880ec2891b185a"),
    "glioblastoma_panobinostat/rl": ("3c0d3d714db5301b", "00668077512f60a1"),
    "glioblastoma_panobinostat/random_id": ("dff08e9ce6af4c12", "729995990a370480"),
    "norman2019_k562/default": ("bc3a070b7d96fa6c", "ba51c76caddbec60"),
    "norman2019_k562/rl": ("8ae3e4650dd866fb", "506ee197b032b67f"),
    "norman2019_k562/random_id": ("925e102a974b17f8", "28242633e5ea77bd"),
    "norman2019_k562/random_ood": ("6e67cf69923debd8", "6c66c60852a70434"),
    "norman_devel/default": ("4c8adeee8ccf50f5", "5b3f36d0f0964cd1"),
    "norman_devel/rl": ("6f73765c96141915", "3f85efb7a60a5cd9"),
    "norman_devel/random_id": ("79ebb7440c910df0", "3c04ba8ae546bd2b"),
    "norman_devel/random_ood": ("e82b08c9166a7509", "a7684087668d2a24"),
    "pbmc68k/default": ("1eaaf458084d3c69", "b32ba6cb42075107"),
    "pbmc68k/rl": ("7d59b07276360470", "20c90599eb93730e"),
    "pbmc68k/random_id": ("7cd47ccaed3dd111", "d12dcabec574f076"),
    "pbmc68k/random_ood": ("7253a1ec27721fa1", "534655d8227b65cb"),
    "scad_plx4720/default": ("b761045678b9511a", "3a0a537cbb9812ea"),
    "scad_plx4720/rl": ("a05338386e791c89", "1a810810353477ad"),
    "scad_plx4720/random_id": ("6cee9b463d244dab", "4f5a9b632aca745e"),
}
CONFIGS = {
    "default": {},
    "rl": {"config": TaskConfig(sft_examples=40, rl_examples=60, seed=1)},
    "random_id": {"config": TaskConfig(top_k=20, hidden_rule="random", seed=2)},
    "random_ood": {
        "split": "ood",
        "config": TaskConfig(top_k=30, n_genes=40, hidden_rule="random", max_examples=300, seed=3),
    },
}


def _digest(prepared) -> tuple[str, str]:
    rows = hashlib.sha256()
    for split, ds in prepared.datasets.items():
        rows.update(split.encode())
        for row in ds.to_list():
            rows.update(json.dumps(row, sort_keys=True).encode())
    meta = hashlib.sha256(json.dumps(prepared.meta, sort_keys=True).encode()).hexdigest()[:16]
    return rows.hexdigest()[:16], meta


def test_pinned_covers_every_embedded_dataset() -> None:
    assert {key.split("/")[0] for key in PINNED} == set(EMBEDDED)


@pytest.mark.parametrize("key", sorted(PINNED))
def test_every_embedded_dataset_prepares_todays_rows(key: str) -> None:
    name, config = key.split("/")
    assert _digest(build_tasks(load_dataset(name), **CONFIGS[config])) == PINNED[key]
