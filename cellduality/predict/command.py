"""The ``cellduality predict`` subcommand: flags and handler (heavy imports inside the handler)."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples (after `make demo`):
  cellduality predict --task annotation --model demo_out/grpo --h5ad pbmc.h5ad --out annotated.h5ad
  cellduality predict --task annotation --model demo_out/grpo --h5ad pbmc.h5ad --samples 4 --out annotated.h5ad
  cellduality predict --task generation --model demo_out/grpo --conditions "CD14+ Monocyte=200,CD56+ NK=100" --out generated.h5ad
  cellduality predict --task perturbation --model demo_out/grpo --h5ad controls.h5ad \\
      --perturbations panobinostat --out perturbed.h5ad --real glioblastoma_panobinostat
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``predict`` to ``cellduality``'s subparsers."""
    p = subparsers.add_parser(
        "predict",
        help="run a trained checkpoint on your own cells: annotation, generation, perturbation (.h5ad out)",
        description=(
            "Annotate cells (label + label-free dual confidence), generate cells for named conditions, or "
            "predict perturbed cells from control cells. Every model setting comes from the checkpoint's "
            "run metadata (cellduality_run.json)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--task", required=True, choices=["annotation", "generation", "perturbation"])
    p.add_argument("--model", required=True, help="checkpoint folder written by SFT or GRPO (or the demo)")
    p.add_argument("--out", required=True, type=Path, help="output .h5ad (an existing file: see --overwrite)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out (and --real-out); without it an existing file is refused",
    )
    p.add_argument(
        "--h5ad", help="annotation: the cells; perturbation: control cells (or all, controls are kept)"
    )
    p.add_argument("--conditions", help='generation: "TYPE=COUNT,TYPE=COUNT", e.g. "CD14+ Monocyte=200"')
    p.add_argument(
        "--perturbations", help="perturbation: comma-separated, A+B for a double, e.g. KLF1,MAP2K6+KLF1"
    )
    p.add_argument(
        "--samples", type=int, default=1, metavar="N", help="best of N sampled answers by the dual score"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (generation, --samples)"
    )
    p.add_argument(
        "--trained-on", help="which of the checkpoint's training datasets, when several have the task"
    )
    p.add_argument("--key-added", default="cellduality", help="prefix of the new obs columns and the uns key")
    p.add_argument(
        "--min-gene-overlap",
        type=float,
        default=0.5,
        help="share of the checkpoint's genes the data must have",
    )
    p.add_argument(
        "--keep-completions", action="store_true", help="annotation: also keep the raw completions in obs"
    )
    p.add_argument(
        "--no-confidence", action="store_true", help="generation: skip the dual check (half the generation)"
    )
    g = p.add_argument_group("perturbation")
    g.add_argument(
        "--cells-per-perturbation", type=int, help="control cells per perturbation (default: every control)"
    )
    g.add_argument(
        "--controls",
        choices=["sentence", "measured"],
        default="sentence",
        help="control cells' X: reconstructed from their sentences (default, like the predictions) or measured",
    )
    g.add_argument(
        "--allow-unseen", action="store_true", help="predict perturbations the checkpoint was not trained on"
    )
    g.add_argument(
        "--real", help="observed cells (.h5ad or embedded name): also write them aligned for cell-eval"
    )
    g.add_argument(
        "--real-out", type=Path, help="where the aligned observed cells go (default: OUT with .real.h5ad)"
    )
    d = p.add_argument_group("your .h5ad (as `cellduality prepare`)")
    d.add_argument("--layer")
    d.add_argument("--gene-symbols")
    d.add_argument("--allow-scaled", action="store_true")
    gen = p.add_argument_group("generation settings")
    gen.add_argument("--batch-size", type=int, default=16)
    gen.add_argument(
        "--max-new-tokens", type=int, help="default: the training run's completion length, else 512"
    )
    gen.add_argument("--backend", choices=["auto", "hf", "vllm"], default="auto", help="auto: vLLM if usable")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)
    return p


def cmd_predict(args: argparse.Namespace) -> int:
    """Handler of ``cellduality predict``: every user mistake is a ``DataError`` (one line, exit 2)."""
    from cellduality.data.schema import DataError
    from cellduality.predict.layout import align_real, cell_eval_command, check_real
    from cellduality.predict.run import annotate, generate, perturb

    at_least = {"--samples": (args.samples, 1), "--batch-size": (args.batch_size, 1)}
    at_least["--max-new-tokens"] = (args.max_new_tokens, 1)
    at_least["--cells-per-perturbation"] = (args.cells_per_perturbation, 1)
    at_least["--temperature"] = (args.temperature, 0)
    for flag, (value, low) in at_least.items():
        if value is not None and value < low:
            raise DataError(f"{flag} must be at least {low}, got {value}")
    if not 0.0 <= args.min_gene_overlap <= 1.0:
        raise DataError(f"--min-gene-overlap must be in [0, 1], got {args.min_gene_overlap}")
    if args.out.is_dir():
        raise DataError(f"--out {args.out} is a folder; give the path of the .h5ad file to write")
    outputs = planned_outputs(args)
    check_outputs(outputs, args)
    if args.task == "perturbation" and args.real:
        check_real(args.real)
    options = {
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "backend": args.backend,
        "seed": args.seed,
        "progress": not args.no_progress,
    }
    data = {
        "layer": args.layer,
        "gene_symbols": args.gene_symbols,
        "allow_scaled": True if args.allow_scaled else None,
    }
    common = {
        "samples": args.samples,
        "temperature": args.temperature,
        "trained_on": args.trained_on,
        "key_added": args.key_added,
    }
    if args.task in ("annotation", "perturbation") and not args.h5ad:
        raise DataError(
            f"--task {args.task} needs --h5ad (the cells to {'annotate' if args.task == 'annotation' else 'perturb'})"
        )
    if args.task == "annotation":
        out = annotate(
            args.h5ad,
            args.model,
            min_gene_overlap=args.min_gene_overlap,
            keep_completions=args.keep_completions,
            **common,
            **data,
            **options,
        )
    elif args.task == "generation":
        if not args.conditions:
            raise DataError('--task generation needs --conditions, e.g. --conditions "CD14+ Monocyte=200"')
        out = generate(args.model, args.conditions, confidence=not args.no_confidence, **common, **options)
    else:
        if not args.perturbations:
            raise DataError(
                "--task perturbation needs --perturbations, e.g. --perturbations KLF1,MAP2K6+KLF1"
            )
        out = perturb(
            args.h5ad,
            args.model,
            args.perturbations,
            cells_per_perturbation=args.cells_per_perturbation,
            controls=args.controls,
            allow_unseen=args.allow_unseen,
            min_gene_overlap=args.min_gene_overlap,
            **common,
            **data,
            **options,
        )
    real = None
    if args.task == "perturbation" and args.real:  # aligned before anything is written: both or neither
        real = align_real(
            args.real, out, key_added=args.key_added, layer=args.layer, gene_symbols=args.gene_symbols
        )
    write_h5ad_atomic(out, args.out)
    print(f"wrote {args.out} ({out.n_obs} cells x {out.n_vars} genes)")
    if args.task == "perturbation":
        real_path = "OBSERVED.h5ad"
        if real is not None:
            real_out = outputs[1]
            write_h5ad_atomic(real, real_out)
            real_path = str(real_out)
            print(f"wrote {real_out} ({real.n_obs} observed cells, same genes and perturbations)")
        print("score it with: " + cell_eval_command(out, str(args.out), real_path, args.key_added))
    return 0


def planned_outputs(args: argparse.Namespace) -> list[Path]:
    """Every file this run will write: ``--out``, and with ``--real`` the aligned observed cells."""
    outputs = [args.out]
    if args.task == "perturbation" and args.real:
        outputs.append(args.real_out or args.out.with_suffix(".real.h5ad"))
    return outputs


def check_outputs(outputs: list[Path], args: argparse.Namespace) -> None:
    """Refuse, before any generation, to replace a file the user has, unless ``--overwrite``.

    Why before: a prediction can take hours; learning at the end that it cannot be saved, or silently
    replacing yesterday's annotations (and a ``.real.h5ad`` written beside them), loses work either way.
    An input file is never an output, even with ``--overwrite``: the run reads it while writing.
    """
    from cellduality.data.schema import DataError

    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) < len(resolved):
        raise DataError(f"--real-out {outputs[-1]} is the same file as --out; give another path")
    inputs = {Path(x).resolve(): flag for flag, x in (("--h5ad", args.h5ad), ("--real", args.real)) if x}
    for path, where in zip(outputs, resolved, strict=True):
        if where in inputs:
            raise DataError(f"{path} is also {inputs[where]}: write the predictions to another file")
    existing = [str(p) for p in outputs if p.exists()]
    if existing and not args.overwrite:
        raise DataError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; give another --out, "
            "or --overwrite to replace"
        )
    for path in outputs:
        if path.is_dir():
            raise DataError(f"{path} is a folder; give the path of the .h5ad file to write")


def write_h5ad_atomic(adata, path: Path) -> None:
    """Write ``adata`` beside ``path`` and rename it into place, so a failed write leaves the old file whole."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only the temporary file this call made
            tmp.unlink()


__all__ = ["add_parser", "check_outputs", "cmd_predict", "planned_outputs", "write_h5ad_atomic"]
