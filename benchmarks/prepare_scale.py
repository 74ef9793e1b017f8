"""The cost curve of ``cellduality prepare`` on atlas-size files: cells/s and peak memory per size.

For each size (default 10^4, 10^5 and 10^6 cells) a synthetic raw-count file is written to disk
(20,000 genes, about ``--nnz`` non-zeros per cell drawn from a skewed gene popularity, count values
with many ties, 12 cell types), block by block with h5py in anndata's CSR layout, so writing it needs
no more memory than reading it. Then ``cellduality prepare --dataset FILE --cell-type-col cell_type
--top-k 100`` (annotation + generation: two examples per cell) runs in a fresh process; its peak
memory is sampled every 0.2 s as the PSS summed over the process tree (a page shared by the forked
workers counts once in all) next to the main process's own RSS, and its wall time measured, with the
seconds of each step that ``meta.json`` records.

On the 10^4-cell file, cell2sentence 1.2's own ``generate_vocabulary`` + ``generate_sentences`` run on
the same normalised matrix, in the Python given by ``--c2s-python`` (a virtual environment with
``pip install cell2sentence==1.2.0``; CellDuality does not depend on it), against CellDuality's
``cell_sentences`` (top 100) on the same matrix, and against the end-to-end ``prepare``. Without that
Python the ratio is skipped and the reason printed.

Also on the 10^4-cell file, in this process: the examples of that preparation built by the column-wise
builders (``TaskPlan.rows``: every example's seeded draws in one compiled pass, Arrow columns) against
the per-example functions they replaced (``annotation_example`` / ``generation_example``: a generator,
a dict and Python lists per example, then ``rows_table``), chunk by chunk (5,000 rows) as ``prepare``
builds them, interleaved, with the summary and label sets each way; both must give the same table.

Targets (issue "Atlas scale", issue 21): peak memory under 3 GB at 10^6 cells; at least 20,000 cells/s
end to end with ``--workers 2``; sentences alone at least 100x cell2sentence.

    python benchmarks/prepare_scale.py [--sizes 10000 100000 1000000] [--workers 2] [--c2s-python PY]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

N_GENES = 20_000
TARGET_RSS_GB = 3.0
TARGET_CELLS_S = 20_000
TARGET_C2S_RATIO = 100.0


def write_counts_file(path: Path, n_cells: int, nnz: int, seed: int = 0, block: int = 20_000) -> float:
    """A raw-count ``.h5ad`` of ``n_cells`` x 20,000 genes, written block by block; returns its GB."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, N_GENES + 1) ** 0.7  # a few genes in every cell, most in few
    popularity = rng.permutation(popularity / popularity.sum())
    cdf = np.cumsum(popularity)
    types = np.array([f"type_{k}" for k in range(12)], dtype=object)
    # obs and var through anndata (an empty X), then X appended as a CSR group, block by block
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(types[rng.integers(0, 12, n_cells)])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"GENE{j}" for j in range(N_GENES)])
    ad.AnnData(obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "a") as f:
        if "X" in f:
            del f["X"]
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        group.attrs["shape"] = np.array([n_cells, N_GENES])
        data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = group.create_dataset(
            "indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,)
        )
        indptr = [np.zeros(1, dtype=np.int64)]
        total = 0
        for start in range(0, n_cells, block):
            b = min(block, n_cells - start)
            draws = np.searchsorted(cdf, rng.random((b, int(nnz * 1.15))), side="right").clip(0, N_GENES - 1)
            draws.sort(axis=1)
            first = np.ones_like(draws, dtype=bool)
            first[:, 1:] = draws[:, 1:] != draws[:, :-1]
            first &= np.cumsum(first, axis=1) <= nnz
            counts = first.sum(axis=1)
            cols = draws[first].astype(np.int32)
            values = rng.geometric(0.45, size=cols.size).astype(np.float32)  # 1, 2, 3 ... counts: many ties
            data.resize((total + cols.size,))
            indices.resize((total + cols.size,))
            data[total:] = values
            indices[total:] = cols
            indptr.append(total + np.cumsum(counts))
            total += cols.size
        group.create_dataset("indptr", data=np.concatenate(indptr))
    return path.stat().st_size / 1e9


def _tree_memory(pid: int) -> tuple[int, int]:
    """(RSS of the process itself, PSS summed over it and its children) in bytes.

    PSS counts a page shared by n processes as 1/n in each, so forked workers (which share the parent's
    pages copy-on-write) are not counted twice, as a sum of RSS would; RSS where PSS cannot be read.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        own = proc.memory_info().rss
    except psutil.Error:
        return 0, 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            info = p.memory_full_info()
            total += getattr(info, "pss", info.rss)
    return own, total


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, float, str]:
    """Run ``cmd``; (wall seconds, peak RSS of the main process and peak PSS of its process tree in
    GB, stderr tail)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_own = peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_own
        while not done.is_set():
            own, tree = _tree_memory(proc.pid)
            peak_own, peak = max(peak_own, own), max(peak, tree)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-2000:]}\n{err[-4000:]}")
    return elapsed, peak_own / 1e9, peak / 1e9, err


_C2S_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import anndata as ad, scanpy as sc
    from cell2sentence.utils import generate_sentences, generate_vocabulary
    adata = ad.read_h5ad(sys.argv[1])
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    t = time.perf_counter()
    vocab = generate_vocabulary(adata)
    sentences = generate_sentences(adata, vocab)
    elapsed = time.perf_counter() - t
    print(json.dumps({"cells": adata.n_obs, "seconds": elapsed, "words": sum(s.count(" ") + 1 for s in sentences[:100])}))
    """
)

_OURS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import anndata as ad, scanpy as sc
    from cellduality.sentences import cell_sentences
    adata = ad.read_h5ad(sys.argv[1])
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    cell_sentences(adata[:200], top_k=100)  # compile the kernel, start the threads
    times = []
    for _ in range(3):
        t = time.perf_counter()
        sentences = cell_sentences(adata, top_k=100)
        times.append(time.perf_counter() - t)
    print(json.dumps({"cells": adata.n_obs, "seconds": sorted(times)[1]}))
    """
)


def _json_run(python: str, script: str, path: Path, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [python, "-c", script, str(path)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _per_example_rows(
    task_plan, split: str, cells: np.ndarray, sentences, data, cfg, gene_scores
) -> list[dict]:
    """The rows of one chunk as the builders made them before issue 21: one ``annotation_example`` /
    ``generation_example`` per cell (its own generator, a dict, Python lists of symbols)."""
    from cellduality.tasks.classification import annotation_example, context_texts
    from cellduality.tasks.common import join_genes, opaque_id
    from cellduality.tasks.generative import generation_example

    obs, task = task_plan.obs, task_plan.task
    labels = obs[data.columns.cell_type].astype(str)
    candidates = sorted(task_plan.pool)
    known = set(candidates)
    ids = obs.index[cells].astype(str).tolist()
    own = labels.iloc[cells].tolist()
    contexts = context_texts(obs, cells, data.columns.context)
    rows = []
    for k, i in enumerate(np.asarray(cells).tolist()):
        sentence = sentences[int(task_plan.positions[i])]
        cands = candidates if own[k] in known else sorted([*candidates, own[k]])
        stored = opaque_id(cfg.seed, data.name, task, split, ids[k])
        if task == "annotation":
            rows.append(
                annotation_example(
                    ids[k],
                    sentence,
                    cands,
                    cfg,
                    data.name,
                    split=split,
                    context=contexts[k],
                    gene_scores=gene_scores,
                    answer=own[k],
                    stored_id=stored,
                )
            )
        else:
            rows.append(
                generation_example(
                    ids[k],
                    own[k],
                    cands,
                    cfg,
                    data.name,
                    split=split,
                    answer=join_genes(sentence[: cfg.answer_genes]),
                    cell_id=ids[k],
                    stored_id=stored,
                )
            )
    return rows


def examples_ratio(path: Path, rounds: int) -> None:
    """Examples of ``path`` (annotation + generation, top 100) built column-wise and per example, chunk
    by chunk, interleaved; prints rows/s of each and the ratio. Both must give the same table."""
    import statistics

    from cellduality.data import Columns, load_dataset
    from cellduality.sentences import GenePresence, cell_sentences
    from cellduality.tasks import TaskConfig
    from cellduality.tasks.columns import FEATURES
    from cellduality.tasks.output import LabelCollector, SummaryCounter, rows_table
    from cellduality.tasks.plan import plan_tasks

    cfg = TaskConfig(top_k=100)
    data = load_dataset(path, Columns(cell_type="cell_type"))
    plan = plan_tasks(data, ["annotation", "generation"], config=cfg)
    sentences = cell_sentences(data.adata, top_k=cfg.top_k, seed=cfg.seed)
    presence = GenePresence(len(sentences.names), cfg.top_k)
    presence.add(0, sentences.genes, sentences.counts)
    scores = presence.scores(sentences.names)
    jobs = [
        (split, task_plan, task_plan.cells[split][lo : lo + 5_000])
        for split in plan.splits
        for task_plan in plan.plans
        for lo in range(0, task_plan.cells[split].size, 5_000)
    ]
    n_rows = sum(chunk.size for *_, chunk in jobs)

    def columns() -> list:
        summary, labels, tables = SummaryCounter(), LabelCollector(), []
        for split, task_plan, chunk in jobs:
            table = task_plan.rows(split, chunk, sentences, data, cfg, scores)
            summary.add_table(split, table)
            if split == "train":
                labels.add_table(table)
            tables.append(table)
        return tables

    def per_example() -> list:
        summary, labels, tables = SummaryCounter(), LabelCollector(), []
        for split, task_plan, chunk in jobs:
            rows = _per_example_rows(task_plan, split, chunk, sentences, data, cfg, scores)
            tables.append(rows_table(rows, FEATURES))
            summary.add(split, rows)
            if split == "train":
                labels.add(rows)
        return tables

    new_tables, old_tables = columns(), per_example()  # warm up (the compiled draws), and compare
    for new, old in zip(new_tables, old_tables, strict=True):
        assert new.to_pylist() == old.to_pylist(), "the column-wise rows differ from the per-example rows"
    t_new, t_old = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        columns()
        t1 = time.perf_counter()
        per_example()
        t_new.append(t1 - t0)
        t_old.append(time.perf_counter() - t1)
    new_s, old_s = statistics.median(t_new), statistics.median(t_old)
    print(
        f"\nexamples of the {data.adata.n_obs:,}-cell file ({n_rows:,} rows, chunks of 5,000, one process, "
        f"median of {rounds} interleaved rounds, same rows):"
    )
    print(
        f"  column-wise builders (TaskPlan.rows)        : {n_rows / new_s:10,.0f} rows/s ({1e6 * new_s / n_rows:.1f} us/row)"
    )
    print(
        f"  per-example functions + rows_table (before) : {n_rows / old_s:10,.0f} rows/s ({1e6 * old_s / n_rows:.1f} us/row)"
    )
    print(f"  ratio                                       : {old_s / new_s:10.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--nnz", type=int, default=1_000, help="non-zeros per cell")
    parser.add_argument("--workers", type=int, default=2, help="prepare --workers")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the examples A/B")
    parser.add_argument("--block-cells", type=int, default=10_000, help="prepare --block-cells")
    parser.add_argument("--workdir", type=Path, default=None, help="where the files go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files and outputs")
    parser.add_argument(
        "--c2s-python",
        default=os.environ.get("CELLDUALITY_C2S_PYTHON"),
        help="a Python with cell2sentence 1.2 installed (default: $CELLDUALITY_C2S_PYTHON)",
    )
    args = parser.parse_args()

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cellduality-scale-", dir=args.workdir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(
        f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f} at start; files in {work}; "
        f"prepare --workers {args.workers}"
    )
    results = []
    first_file = None
    try:
        for n in args.sizes:
            path = work / f"synthetic_{n}.h5ad"
            t0 = time.perf_counter()
            size_gb = write_counts_file(path, n, args.nnz)
            # the file on disk before prepare starts, as a user's file is: otherwise the kernel writes the
            # file's gigabytes back while prepare reads it, and that is timed as prepare's
            os.sync()
            written = time.perf_counter() - t0
            first_file = first_file or path
            cmd = [
                sys.executable,
                "-m",
                "cellduality.cli",
                "prepare",
                "--dataset",
                str(path),
                "--cell-type-col",
                "cell_type",
                "--top-k",
                "100",
                "--out",
                str(work / f"prepared_{n}"),
                "--block-cells",
                str(args.block_cells),
                "--workers",
                str(args.workers),
            ]
            seconds, own_gb, peak_gb, _ = run_measured(cmd, env)
            meta = json.loads((work / f"prepared_{n}" / "meta.json").read_text())
            rows = sum(r["rows"] for r in meta["summary"])
            results.append((n, size_gb, seconds, n / seconds, peak_gb, own_gb, rows))
            phases = meta["streaming"]
            print(
                f"  {n:>9,} cells: file {size_gb:5.2f} GB (written in {written:.0f} s), prepare {seconds:7.1f} s, "
                f"{n / seconds:8,.0f} cells/s, peak PSS {peak_gb:5.2f} GB (main process RSS {own_gb:.2f}), "
                f"{rows:,} examples (load {os.getloadavg()[0]:.1f}); seconds: checks {phases['check_s']}, "
                f"sentences {phases['sentences_s']}, fit {phases['fit_s']}, examples {phases['examples_s']}",
                flush=True,
            )
            if not args.keep:
                shutil.rmtree(work / f"prepared_{n}")
                if n != args.sizes[0]:
                    path.unlink()

        print(
            "\ncellduality prepare (top-100 sentences, annotation + generation), one fresh process per size"
        )
        print(
            f"{'cells':>10} {'file GB':>8} {'seconds':>8} {'cells/s':>9} {'peak PSS GB':>12} {'main RSS GB':>12}"
        )
        for n, size_gb, seconds, rate, peak_gb, own_gb, _ in results:
            print(f"{n:>10,} {size_gb:>8.2f} {seconds:>8.1f} {rate:>9,.0f} {peak_gb:>12.2f} {own_gb:>12.2f}")
        largest = results[-1]
        print(
            f"peak memory at {largest[0]:,} cells: {largest[4]:.2f} GB (target <= {TARGET_RSS_GB:.0f} GB: "
            f"{'met' if largest[4] <= TARGET_RSS_GB else 'NOT met'}); end to end at {largest[0]:,} cells: "
            f"{largest[3]:,.0f} cells/s (target >= {TARGET_CELLS_S:,} with --workers 2: "
            f"{'met' if largest[3] >= TARGET_CELLS_S and args.workers == 2 else 'NOT met'}); "
            f"load average {os.getloadavg()[0]:.1f} at the end"
        )

        examples_ratio(first_file, args.rounds)

        print(f"\ncell2sentence 1.2 on the {args.sizes[0]:,}-cell file (normalised the same way, not timed)")
        if not args.c2s_python:
            print("  skipped: no --c2s-python (a Python with `pip install cell2sentence==1.2.0`)")
            return
        try:
            c2s = _json_run(args.c2s_python, _C2S_SCRIPT, first_file, env)
        except (OSError, RuntimeError) as exc:
            print(f"  skipped: cell2sentence could not run in {args.c2s_python}: {str(exc).strip()[-300:]}")
            return
        ours = _json_run(sys.executable, _OURS_SCRIPT, first_file, env)
        c2s_rate = c2s["cells"] / c2s["seconds"]
        ours_rate = ours["cells"] / ours["seconds"]
        e2e_rate = results[0][3]
        print(f"  cell2sentence generate_vocabulary + generate_sentences : {c2s_rate:10,.0f} cells/s")
        print(
            f"  cellduality cell_sentences (top 100), same matrix      : {ours_rate:10,.0f} cells/s = "
            f"{ours_rate / c2s_rate:.1f}x (target >= {TARGET_C2S_RATIO:.0f}x: "
            f"{'met' if ours_rate / c2s_rate >= TARGET_C2S_RATIO else 'NOT met'})"
        )
        print(
            f"  cellduality prepare end to end (reads, checks, writes)  : {e2e_rate:10,.0f} cells/s = "
            f"{e2e_rate / c2s_rate:.1f}x"
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # the temp folder this run created


if __name__ == "__main__":
    main()
