"""The three uses of a trained checkpoint on a user's cells: annotate, generate, perturb.

Each takes and returns AnnData (scanpy style: annotation writes into the given object unless
``copy=True``; generation and perturbation return new objects) and reads every model setting from the
checkpoint's run metadata (:mod:`.checkpoint`). What was done to the data is printed.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellduality.data.loading import read_h5ad
from cellduality.data.schema import DataError
from cellduality.inference.engine import Engine, best_of
from cellduality.inference.generate import GenerationSettings
from cellduality.parsing import gene_vocabulary, parse_genes, parse_label
from cellduality.predict.cells import prepare_cells, require_context
from cellduality.predict.checkpoint import Checkpoint, TrainedDataset, match_condition
from cellduality.predict.examples import annotation_example, generation_example, perturbation_example
from cellduality.sentences import sentences_to_matrix
from cellduality.tasks.classification import context_text
from cellduality.tasks.generative import perturbation_text

DEFAULT_MAX_NEW_TOKENS = 512


def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(f"cellduality predict: {text}", file=sys.stderr)


def _as_anndata(data: ad.AnnData | str | Path) -> tuple[ad.AnnData, str]:
    if isinstance(data, ad.AnnData):
        return data, "the AnnData"
    return read_h5ad(data), str(data)


def _engine(model: str | Path, ckpt: Checkpoint, options: Mapping[str, Any], factory: Any = None) -> Engine:
    settings = GenerationSettings(
        max_new_tokens=int(options.get("max_new_tokens") or ckpt.max_new_tokens or DEFAULT_MAX_NEW_TOKENS),
        seed=int(options.get("seed", 0)),
        batch_size=int(options.get("batch_size", 16)),
    )
    return Engine(
        str(model), settings, options.get("backend", "auto"), factory, options.get("progress", True)
    )


def _info(ckpt: Checkpoint, trained: TrainedDataset, engine: Engine, **extra: Any) -> dict[str, Any]:
    """``uns['cellduality']``: what produced the predictions (h5ad-serialisable)."""
    fit = trained.meta["fit"]
    return {
        "model": str(ckpt.path),
        "trained_on": trained.name,
        "top_k": int(trained.config.top_k),
        "n_genes": int(trained.config.answer_genes),
        "backend": engine.backend_name,
        "max_new_tokens": int(engine.settings.max_new_tokens),
        "fit": {k: float(fit[k]) for k in ("slope", "intercept", "r2")},
        **{k: v for k, v in extra.items() if v is not None},
    }


def _user_cells(
    user: ad.AnnData,
    trained: TrainedDataset,
    where: str,
    layer: str | None,
    gene_symbols: str | None,
    allow_scaled: bool,
    min_gene_overlap: float,
    verbose: bool,
) -> tuple[Any, list[str]]:
    """The user's cells under the training data's rules (what was done is printed), and the context
    columns the checkpoint's prompts need."""
    cells = prepare_cells(
        user,
        trained,
        where=where,
        layer=layer,
        gene_symbols=gene_symbols,
        allow_scaled=allow_scaled,
        min_gene_overlap=min_gene_overlap,
    )
    for note in cells.notes:
        _say(verbose, note)
    return cells, require_context(cells.adata.obs, trained, where)


def _reconstruct(sentences: Sequence[Sequence[str]], trained: TrainedDataset) -> sp.csr_matrix:
    """Expression over the trained genes from ranks with the stored fit; an empty sentence is all zeros."""
    x = sentences_to_matrix(sentences, trained.genes, trained.fit).astype(np.float32)
    return sp.csr_matrix(x)


# ----------------------------------------------------------------------------------------------------
# annotation


def annotate(
    adata: ad.AnnData | str | Path,
    model: str | Path,
    *,
    samples: int = 1,
    temperature: float = 1.0,
    trained_on: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool | None = None,
    min_gene_overlap: float = 0.5,
    key_added: str = "cellduality",
    copy: bool = False,
    keep_completions: bool = False,
    verbose: bool = True,
    backend_factory: Any = None,
    **options: Any,
) -> ad.AnnData:
    """Cell type of every cell, with a label-free confidence; new ``obs`` columns ``{key_added}_*``.

    ``_label`` (a candidate of the checkpoint, missing when the answer named none), ``_valid``,
    ``_confidence`` (the dual self-verification score: RWJS of the hidden genes the model in-paints
    given its own predicted label, in [0, 1]; 0 for an answer that names no candidate). ``samples`` > 1
    keeps, per cell, the best of that many sampled answers by this score (``_usable_samples`` says how
    many named a candidate). Cells with no expressed checkpoint gene get no prediction (missing label).
    ``options``: ``batch_size``, ``max_new_tokens``, ``backend`` (auto|hf|vllm), ``seed``, ``progress``.
    """
    ckpt = Checkpoint.load(model)
    trained = ckpt.dataset_for("annotation", trained_on)
    candidates = [str(c) for c in trained.labels("annotation") or []]
    if not candidates:
        raise DataError(f"the checkpoint records no cell types for {trained.name!r}")
    user, where = _as_anndata(adata)
    cells, ctx_cols = _user_cells(
        user, trained, where, layer, gene_symbols, allow_scaled, min_gene_overlap, verbose
    )
    cfg = trained.config
    scores_of_genes = trained.gene_scores(cells.sentences)
    rows, kept = [], []
    for i, sentence in enumerate(cells.sentences):
        if not sentence:
            continue
        obs_row = cells.adata.obs.iloc[i]
        ctx = context_text(obs_row, ctx_cols) if ctx_cols else ""
        rows.append(
            annotation_example(
                str(cells.adata.obs_names[i]),
                sentence,
                candidates,
                cfg,
                trained.name,
                context=ctx,
                gene_scores=scores_of_genes,
            )
        )
        kept.append(int(cells.positions[i]))
    engine = _engine(model, ckpt, options, backend_factory)
    vocab = gene_vocabulary(trained.genes)
    chosen, scores, usable = best_of(
        rows,
        engine,
        vocab,
        samples=samples,
        temperature=temperature if samples > 1 else 0.0,
        seed=cfg.seed,
        desc="annotating",
    )
    target = user.copy() if copy and isinstance(adata, ad.AnnData) else user  # a file read here is ours
    n = target.n_obs
    labels = np.full(n, None, dtype=object)
    valid = np.zeros(n, dtype=bool)
    confidence = np.full(n, np.nan)
    for row, completion, score, pos in zip(rows, chosen, scores, kept, strict=True):
        label = parse_label(completion, row["candidates"])
        labels[pos] = label
        valid[pos] = label is not None
        confidence[pos] = float(score)
    target.obs[f"{key_added}_label"] = pd.Categorical(labels, categories=candidates)
    target.obs[f"{key_added}_valid"] = valid
    target.obs[f"{key_added}_confidence"] = confidence
    if samples > 1:
        counts = np.zeros(n, dtype=np.int64)
        counts[kept] = usable
        target.obs[f"{key_added}_usable_samples"] = counts
    if keep_completions:
        texts = np.full(n, "", dtype=object)
        texts[kept] = chosen
        target.obs[f"{key_added}_completion"] = texts.astype(str)
    target.uns[key_added] = _info(
        ckpt,
        trained,
        engine,
        task="annotation",
        samples=int(samples),
        candidates=candidates,
        notes=cells.notes,
        confidence="dual self-verification: RWJS of the hidden genes in-painted given the predicted label",
    )
    _say(
        verbose,
        f"annotated {len(rows)} of {n} cells: {valid.sum()} named a candidate ({valid.mean():.0%}), "
        f"mean confidence {np.nanmean(confidence) if len(rows) else float('nan'):.3f}",
    )
    return target


# ----------------------------------------------------------------------------------------------------
# generation


def parse_counts(conditions: Mapping[str, int] | str) -> dict[str, int]:
    """``{"CD14+ Monocyte": 200}`` or ``"CD14+ Monocyte=200,CD56+ NK=100"`` -> condition -> count."""
    if isinstance(conditions, Mapping):
        items = list(conditions.items())
    else:
        items = []
        for part in str(conditions).split(","):
            if not part.strip():
                continue
            name, sep, count = part.rpartition("=")
            if not sep:
                raise DataError(
                    f'--conditions: {part.strip()!r} is not NAME=COUNT (e.g. "CD14+ Monocyte=200")'
                )
            items.append((name.strip(), count.strip()))
    out: dict[str, int] = {}
    for name, count in items:
        try:
            value = int(count)
        except (TypeError, ValueError):
            raise DataError(
                f"--conditions: the count of {name!r} must be a whole number, got {count!r}"
            ) from None
        if value < 1:
            raise DataError(f"--conditions: the count of {name!r} must be at least 1, got {value}")
        out[str(name)] = out.get(str(name), 0) + value
    if not out:
        raise DataError('no condition given: pass for example --conditions "CD14+ Monocyte=200"')
    return out


def generate(
    model: str | Path,
    conditions: Mapping[str, int] | str,
    *,
    samples: int = 1,
    temperature: float = 1.0,
    trained_on: str | None = None,
    key_added: str = "cellduality",
    confidence: bool = True,
    verbose: bool = True,
    backend_factory: Any = None,
    **options: Any,
) -> ad.AnnData:
    """Generated cells for named conditions (cell types the checkpoint learnt), ``count`` cells each.

    ``X`` is expression reconstructed from the generated ranks with the trained dataset's rank ->
    expression fit (not a measurement), over the checkpoint's genes; ``obs`` holds the condition (under
    the training data's cell-type column name), ``{key_added}_sentence``, ``_valid`` and ``_confidence``
    (1 when the model names the prompted type from its own generated cell, the generation dual).
    Answers are sampled (``temperature``); ``samples`` > 1 keeps the best of that many by the dual.
    """
    ckpt = Checkpoint.load(model)
    trained = ckpt.dataset_for("generation", trained_on)
    known = [str(c) for c in trained.labels("generation") or []]
    wanted: dict[str, int] = {}
    for name, count in parse_counts(conditions).items():
        found = match_condition(name, known)
        if found is None:
            raise DataError(f"unknown condition {name!r}: the checkpoint generates {', '.join(known)}")
        wanted[found] = wanted.get(found, 0) + count
    cfg = trained.config
    rows = [
        generation_example(f"{cond}/{k}", cond, known, cfg, trained.name)
        for cond, count in wanted.items()
        for k in range(count)
    ]
    engine = _engine(model, ckpt, options, backend_factory)
    vocab = gene_vocabulary(trained.genes)
    chosen, scores, _ = best_of(
        rows,
        engine,
        vocab,
        samples=samples,
        temperature=temperature,
        seed=cfg.seed,
        desc="generating cells",
        confidence=confidence,
    )
    sentences = [parse_genes(c, vocab, int(r["n_genes"]) or None) for r, c in zip(rows, chosen, strict=True)]
    column = trained.columns.cell_type or "condition"
    obs = pd.DataFrame(
        {
            column: pd.Categorical([r["condition"] for r in rows], categories=list(wanted)),
            f"{key_added}_sentence": [" ".join(s) for s in sentences],
            f"{key_added}_valid": [bool(s) for s in sentences],
            f"{key_added}_confidence": scores,
        },
        index=pd.Index([f"generated-{i}" for i in range(len(rows))]),
    )
    out = ad.AnnData(
        X=_reconstruct(sentences, trained),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(trained.genes, name="gene_symbol")),
    )
    out.uns[key_added] = _info(
        ckpt,
        trained,
        engine,
        task="generation",
        samples=int(samples),
        temperature=float(temperature),
        condition_column=column,
        conditions={k: int(v) for k, v in wanted.items()},
        note="X is reconstructed from the generated gene ranks with the stored rank -> expression fit",
    )
    valid = obs[f"{key_added}_valid"].to_numpy()
    _say(verbose, f"generated {len(rows)} cells ({valid.mean():.0%} with genes) for {', '.join(wanted)}")
    return out


# ----------------------------------------------------------------------------------------------------
# perturbation


def parse_perturbations(perturbations: Sequence[str] | str) -> list[str]:
    items = perturbations.split(",") if isinstance(perturbations, str) else list(perturbations)
    out = list(dict.fromkeys(str(p).strip() for p in items if str(p).strip()))
    if not out:
        raise DataError("no perturbation given: pass for example --perturbations KLF1,MAP2K6+KLF1")
    return out


def _same_targets(name: str, known: Sequence[str]) -> str | None:
    """The known combination with the same targets in another order (``MAP2K6+KLF1`` -> ``KLF1+MAP2K6``)."""
    targets = sorted(t.strip().casefold() for t in name.split("+") if t.strip())
    for candidate in known:
        if sorted(t.strip().casefold() for t in candidate.split("+") if t.strip()) == targets:
            return candidate
    return None


def perturb(
    adata: ad.AnnData | str | Path,
    model: str | Path,
    perturbations: Sequence[str] | str,
    *,
    cells_per_perturbation: int | None = None,
    controls: str = "sentence",
    allow_unseen: bool = False,
    samples: int = 1,
    temperature: float = 1.0,
    trained_on: str | None = None,
    layer: str | None = None,
    gene_symbols: str | None = None,
    allow_scaled: bool | None = None,
    min_gene_overlap: float = 0.5,
    key_added: str = "cellduality",
    verbose: bool = True,
    backend_factory: Any = None,
    **options: Any,
) -> ad.AnnData:
    """Predicted perturbed cells from control cells, plus the controls, in the layout cell-eval reads.

    The result has the training data's perturbation column (control cells hold its control value),
    its context columns (cell line, donor: cell-eval's ``--celltype-col``) and the checkpoint's genes as
    ``var_names``. Each control cell (or ``cells_per_perturbation`` of them, seeded) is perturbed once
    per perturbation; ``X`` of a predicted cell is reconstructed from its generated ranks with the
    stored fit. ``controls="sentence"`` puts the controls through the same reconstruction (their own
    sentences), so predicted minus control is the model's change and not the difference between a
    reconstruction and a measurement; ``"measured"`` keeps their log-normalised expression.
    Perturbations the checkpoint was not trained on are refused unless ``allow_unseen``.
    """
    if controls not in ("sentence", "measured"):
        raise DataError(f"controls must be 'sentence' or 'measured', got {controls!r}")
    if cells_per_perturbation is not None and cells_per_perturbation < 1:
        raise DataError(f"--cells-per-perturbation must be at least 1, got {cells_per_perturbation}")
    ckpt = Checkpoint.load(model)
    trained = ckpt.dataset_for("perturbation", trained_on)
    labels = trained.labels("perturbation") or {}
    cols = trained.columns
    pert_col, control_value = str(cols.perturbation), str(labels.get("control", cols.control_value))
    known: dict[str, dict[str, str]] = labels.get("conditions") or {}
    trained_names = list(labels.get("trained") or known)  # the perturbations training prompts named
    asked = []
    for name in parse_perturbations(perturbations):
        found = match_condition(name, trained_names) or _same_targets(name, trained_names)
        if found is not None and found != name:
            _say(verbose, f"{name} is the checkpoint's {found}")
        if found is None and not allow_unseen:
            raise DataError(
                f"unknown perturbation {name!r}: the checkpoint was trained on {len(trained_names)} "
                f"perturbation{'s' if len(trained_names) != 1 else ''} "
                f"({', '.join(trained_names[:8])}{', ...' if len(trained_names) > 8 else ''}); pass --allow-unseen to "
                "predict it out of distribution"
            )
        asked.append(found or name)
    user, where = _as_anndata(adata)
    if pert_col in user.obs.columns:
        is_control = user.obs[pert_col].astype(str).to_numpy() == control_value
        if not is_control.any():
            raise DataError(
                f"{where} has a {pert_col!r} column but no control cell ({pert_col} == {control_value!r})"
            )
        if not is_control.all():
            _say(verbose, f"kept the {int(is_control.sum())} control cells ({pert_col} == {control_value!r})")
            user = user[is_control].copy()
    cells, ctx_cols = _user_cells(
        user, trained, where, layer, gene_symbols, allow_scaled, min_gene_overlap, verbose
    )
    obs = cells.adata.obs
    contexts = [context_text(obs.iloc[i], ctx_cols) if ctx_cols else "" for i in range(obs.shape[0])]
    usable = np.flatnonzero([bool(s) for s in cells.sentences])
    if usable.size == 0:
        raise DataError(f"no control cell of {where} expresses a gene of the checkpoint")
    cfg = trained.config
    rows, sources = [], []
    for pert in asked:
        texts = known.get(pert) or {}
        pool = usable
        if cells_per_perturbation is not None:
            rng = np.random.default_rng([cfg.seed, zlib.crc32(pert.encode())])
            pool = np.sort(
                rng.choice(usable, size=cells_per_perturbation, replace=cells_per_perturbation > usable.size)
            )
        for k, i in enumerate(pool):
            ctx = contexts[i]
            text = (
                texts.get(ctx)
                or next(iter(texts.values()), None)
                or perturbation_text(pert, cols, None, None)
            )
            others = [p for p in trained_names if ctx in known.get(p, {})] or trained_names
            cell_id = str(obs.index[i])
            rows.append(
                perturbation_example(
                    f"{pert}/{k}/{cell_id}",
                    cells.sentences[i],
                    pert,
                    text,
                    others,
                    control_value,
                    cfg,
                    trained.name,
                    context=ctx,
                    cell_id=cell_id,
                )
            )
            sources.append(int(i))
    engine = _engine(model, ckpt, options, backend_factory)
    vocab = gene_vocabulary(trained.genes)
    chosen, scores, _ = best_of(
        rows,
        engine,
        vocab,
        samples=samples,
        temperature=temperature if samples > 1 else 0.0,
        seed=cfg.seed,
        desc="predicting perturbations",
    )
    n = int(cfg.answer_genes)
    predicted = [parse_genes(c, vocab, n) for c in chosen]
    if controls == "sentence":
        control_x = _reconstruct([cells.sentences[i][:n] for i in range(obs.shape[0])], trained)
    else:
        control_x = sp.csr_matrix(cells.adata.X, dtype=np.float32)
    pred_obs = pd.DataFrame(
        {
            pert_col: [r["condition"] for r in rows],
            **{c: obs[c].astype(str).to_numpy()[sources] for c in ctx_cols},
            f"{key_added}_source": "predicted",
            f"{key_added}_control_cell": [r["cell_id"] for r in rows],
            f"{key_added}_sentence": [" ".join(s) for s in predicted],
            f"{key_added}_valid": [bool(s) for s in predicted],
            f"{key_added}_confidence": scores,
        },
        index=pd.Index([f"predicted-{j}" for j in range(len(rows))]),
    )
    ctrl_obs = pd.DataFrame(
        {
            pert_col: control_value,
            **{c: obs[c].astype(str).to_numpy() for c in ctx_cols},
            f"{key_added}_source": f"control ({controls})",
            f"{key_added}_control_cell": [str(x) for x in obs.index],
            f"{key_added}_sentence": [" ".join(s[:n]) for s in cells.sentences],
            f"{key_added}_valid": True,
            f"{key_added}_confidence": np.nan,
        },
        index=pd.Index([str(x) for x in obs.index]),
    )
    all_obs = pd.concat([pred_obs, ctrl_obs])
    for c in [pert_col, *ctx_cols, f"{key_added}_source"]:
        all_obs[c] = pd.Categorical(all_obs[c].astype(str))
    out = ad.AnnData(
        X=sp.vstack([_reconstruct(predicted, trained), control_x]).tocsr(),
        obs=all_obs,
        var=pd.DataFrame(index=pd.Index(trained.genes, name="gene_symbol")),
    )
    out.obs_names_make_unique()
    celltype = ctx_cols[0] if len(ctx_cols) == 1 else None
    out.uns[key_added] = _info(
        ckpt,
        trained,
        engine,
        task="perturbation",
        samples=int(samples),
        controls=controls,
        notes=cells.notes,
        cell_eval={
            "pert_col": pert_col,
            "control_pert": control_value,
            **({"celltype_col": celltype} if celltype else {}),
        },
        note="X of predicted cells is reconstructed from their generated gene ranks with the stored fit",
    )
    valid = pred_obs[f"{key_added}_valid"].to_numpy()
    _say(
        verbose,
        f"predicted {len(rows)} cells for {len(asked)} perturbation(s) from {obs.shape[0]} controls "
        f"({valid.mean():.0%} with genes)",
    )
    return out


__all__ = [
    "annotate",
    "generate",
    "parse_counts",
    "parse_perturbations",
    "perturb",
]
