"""What a user takes away from a run: a model card (``README.md``) in every SFT and GRPO output folder.

The card is the Hugging Face format (YAML front matter, then Markdown) and says what someone who finds
the folder, or the Hub repository, needs: the base model, the data and their licences, the recipe's
settings, the rewards and their weights, the dual check's verdicts and the evaluation's headline when
they were run, and how to load the model with ``cellduality predict``. Everything comes from the
trainer's arguments and the run metadata (``cellduality_run.json``), never from a label.

``finish_run`` is called by every rank at the end of ``run_sft`` / ``run_grpo``: the first rank writes
the card, and with ``--push_to_hub`` (and ``hub_model_id``) every rank calls the trainer's own
``push_to_hub``, whose model-card hook (``create_model_card``, TRL's draft card otherwise) writes this
card instead, so the Hub gets the same folder: weights, tokenizer, run metadata and card. The push is
collective (``push_to_hub`` saves the model first, which gathers ZeRO-3 shards), hence every rank.

A dual check or an evaluation run later adds its results to an existing card:

    python -m cellduality.train.model_card outputs/llama-3.2-3b/grpo_dual \\
        --dual-check dual_check_out --eval eval/llama-3.2-3b/pbmc68k
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CARD = "README.md"

#: embedded datasets -> licence (cellduality/data/resources/SOURCES.md; a test keeps them equal)
DATA_LICENCES: dict[str, str] = {
    "pbmc68k": "BSD-3-Clause",
    "norman_devel": "BSD-3-Clause",
    "norman2019_k562": "BSD-3-Clause",
    "glioblastoma_panobinostat": "MIT",
    "scad_plx4720": "Apache-2.0",
}

#: training settings worth a line on the card, in this order (TRL's names)
_SETTINGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "steps_per_generation",
    "max_completion_length",
    "max_length",
    "temperature",
    "beta",
    "loss_type",
    "use_vllm",
    "vllm_mode",
    "bf16",
    "seed",
)


def _base_model(model_name_or_path: str | None) -> tuple[str | None, str | None]:
    """(Hub id of the base model, local folder it was loaded from): a local folder written by a
    CellDuality stage names its own base in its card, so a GRPO model points at the SFT's base."""
    if not model_name_or_path:
        return None, None
    folder = Path(model_name_or_path)
    if not folder.is_dir():
        return model_name_or_path, None
    card = folder / CARD
    if card.is_file():
        front = _front_matter(card.read_text())
        if front.get("base_model"):
            return str(front["base_model"]), str(folder)
    return None, str(folder)


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    data = yaml.safe_load(text[4:end]) if end > 0 else None
    return data if isinstance(data, dict) else {}


def _datasets(run_meta: Mapping[str, Any]) -> list[str]:
    prepared = run_meta.get("prepared") or {}
    parts = prepared.get("parts") or {}
    if parts:
        return [str(p.get("dataset", name)) for name, p in parts.items()]
    name = prepared.get("dataset")
    return str(name).split("+") if name else []


def _dual_check_lines(folder: Path) -> list[str]:
    from cellduality.eval.dual_check import load_dual_check

    path = folder / "dual_check.json" if folder.is_dir() else folder
    lines = ["| dataset | task | split | verdict |", "|---|---|---|---|"]
    for check in load_dual_check(path):
        lines.append(f"| {check['dataset']} | {check['task']} | {check['split']} | {check['verdict']} |")
    return lines


def _eval_lines(folder: Path, model_dir: Path) -> list[str]:
    """Per task, this model's headline metrics next to the best baseline of ``metrics.json``."""
    from cellduality.eval.headline import HEADLINE_METRICS

    path = folder / "metrics.json" if folder.is_dir() else folder
    payload = json.loads(path.read_text())
    ours = _method_of(payload.get("run", {}), model_dir)
    lines = ["| task | metric | this model | best baseline |", "|---|---|---|---|"]
    for task, result in payload.get("tasks", {}).items():
        methods = result.get("methods", {})
        mine = methods.get(ours) if ours else None
        if mine is None:
            continue
        for metric in HEADLINE_METRICS.get(task, [])[:1]:
            baselines = [
                m["metrics"].get(metric)
                for name, m in methods.items()
                if m.get("kind") == "baseline" and isinstance(m["metrics"].get(metric), (int, float))
            ]
            best = f"{max(baselines):.3f}" if baselines else "—"
            value = mine["metrics"].get(metric)
            shown = f"{value:.3f}" if isinstance(value, (int, float)) else "—"
            lines.append(f"| {task} | {metric} | {shown} | {best} |")
    return lines if len(lines) > 2 else []


def _method_of(run: Mapping[str, Any], model_dir: Path) -> str | None:
    """The name this model was evaluated under (``--model PATH,name=NAME``), matched by its path."""
    for model in run.get("models", []) or []:
        path = model.get("path") or model.get("model")
        if path and Path(str(path)).resolve() == model_dir.resolve():
            return model.get("name")
    models = run.get("models", []) or []
    return models[0].get("name") if len(models) == 1 else None


def render_card(
    model_dir: str | Path,
    stage: str,
    run_meta: Mapping[str, Any],
    settings: Mapping[str, Any],
    base_model: str | None,
    base_folder: str | None = None,
    rewards: Sequence[tuple[str, float]] = (),
    hub_model_id: str | None = None,
    dual_check: str | Path | None = None,
    evaluation: str | Path | None = None,
) -> str:
    """The card's text. ``settings`` are the training settings shown; ``rewards`` (name, weight)."""
    model_dir = Path(model_dir)
    datasets = _datasets(run_meta)
    licences = {d: DATA_LICENCES.get(d, "your data's own licence") for d in datasets}
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation"}
    if base_model:
        front["base_model"] = base_model
    front["license"] = "other"  # the base model's licence governs the weights (see below)
    front["tags"] = ["cellduality", "single-cell", "cell-sentences", "trl", stage]
    name = hub_model_id or model_dir.name
    tasks = (run_meta.get("prepared") or {}).get("tasks") or []
    out = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    what = "supervised fine-tuning (SFT)" if stage == "sft" else "GRPO reinforcement learning"
    out.append(
        f"A language model trained with CellDuality by {what} to read and write "
        "*cell sentences* (a cell's expressed genes, most expressed first)"
        + (f", on the tasks {', '.join(tasks)}." if tasks else ".")
    )
    out += ["", "## Base model", ""]
    if base_model:
        out.append(f"`{base_model}`" + (f" (loaded from `{base_folder}`)" if base_folder else "") + ".")
    else:
        out.append(f"Loaded from the local folder `{base_folder or '?'}` (no Hub id recorded).")
    out.append("Its licence and use policy apply to these weights.")
    out += ["", "## Data and licences", "", "| dataset | licence |", "|---|---|"]
    out += [f"| {d} | {lic} |" for d, lic in licences.items()] or ["| (not recorded) | |"]
    sentences = run_meta.get("sentences") or {}
    if sentences:
        out += ["", "Sentence settings (genes per input sentence / per generated cell): "]
        out[-1] += (
            "; ".join(f"{d}: {s.get('top_k')} / {s.get('n_genes')}" for d, s in sentences.items()) + "."
        )
    out += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    out += [f"| `{k}` | {settings[k]} |" for k in _SETTINGS if k in settings and settings[k] is not None]
    out += [f"| `{k}` | {v} |" for k, v in settings.items() if k not in _SETTINGS and v is not None]
    if rewards:
        mode = run_meta.get("reward_mode", "")
        out += ["", "## Rewards", "", f"Reward mode: `{mode}`.", "", "| reward | weight |", "|---|---|"]
        out += [f"| `{r}` | {w:g} |" for r, w in rewards]
        if mode == "self_supervised":
            out += ["", "No label reached any reward: the dual reward is the model's own consistency."]
    out += ["", "## Dual check", ""]
    out += _dual_check_lines(Path(dual_check)) if dual_check else ["Not run for this card."]
    out += ["", "## Evaluation", ""]
    table = _eval_lines(Path(evaluation), model_dir) if evaluation else []
    out += table or ["Not run for this card (`cellduality eval`)."]
    where = hub_model_id or str(model_dir)
    out += [
        "",
        "## How to use",
        "",
        "```bash",
        f"cellduality predict --task annotation --model {where} --h5ad my_cells.h5ad --out annotated.h5ad",
        "```",
        "",
        "`cellduality predict` reads the sentence settings, genes and candidate labels from "
        "`cellduality_run.json` next to the weights; the weights load with `transformers` "
        "(`AutoModelForCausalLM.from_pretrained`).",
        "",
    ]
    return "\n".join(out)


def card_from_trainer(trainer: Any, stage: str, cd_args: Any, model_args: Any, output_dir: str | Path) -> str:
    """The card of a finished run, from its trainer, its arguments and the run metadata on disk."""
    from cellduality.modeling.checkpoint import read_run_meta

    args = trainer.args
    run_meta = read_run_meta(output_dir) or {}
    settings = {k: getattr(args, k, None) for k in _SETTINGS}
    if stage == "grpo":
        settings.update(
            dual_max_new_tokens=getattr(cd_args, "dual_max_new_tokens", None),
            dual_do_sample=getattr(cd_args, "dual_do_sample", None),
        )
    else:
        for k in ("num_generations", "steps_per_generation", "max_completion_length", "temperature", "beta"):
            settings.pop(k, None)
    rewards: list[tuple[str, float]] = []
    if stage == "grpo":
        names = list(getattr(cd_args, "reward_funcs", []) or [])
        weights = list(getattr(args, "reward_weights", None) or [1.0] * len(names))
        rewards = list(zip(names, (float(w) for w in weights), strict=True))
    base, folder = _base_model(getattr(model_args, "model_name_or_path", None))
    return render_card(
        output_dir,
        stage,
        run_meta,
        settings,
        base,
        folder,
        rewards,
        hub_model_id=getattr(args, "hub_model_id", None),
    )


def finish_run(trainer: Any, stage: str, cd_args: Any, model_args: Any) -> Path:
    """Every rank: the first writes ``README.md``; with ``push_to_hub`` all push through the trainer."""
    out = Path(trainer.args.output_dir)
    card = out / CARD
    text = card_from_trainer(trainer, stage, cd_args, model_args, out)

    def create_model_card(self: Any, *args: Any, **kwargs: Any) -> None:  # the push's card hook
        if self.is_world_process_zero():
            card.write_text(text)

    trainer.create_model_card = types.MethodType(create_model_card, trainer)
    trainer.create_model_card()
    if trainer.args.push_to_hub:
        trainer.push_to_hub(commit_message="End of training: model, tokenizer, cellduality_run.json, card")
    return card


def refresh(model_dir: str | Path, dual_check: str | Path | None, evaluation: str | Path | None) -> Path:
    """Add a dual check's verdicts and an evaluation's headline to the card of ``model_dir``."""
    model_dir = Path(model_dir)
    card = model_dir / CARD
    if not card.is_file():
        raise FileNotFoundError(f"{model_dir} has no {CARD}: it was not written by a CellDuality stage")
    text = card.read_text()
    head, _, _ = text.partition("\n## Dual check\n")
    tail = text.split("\n## How to use\n", 1)[1] if "\n## How to use\n" in text else ""
    middle = ["", "## Dual check", ""]
    middle += _dual_check_lines(Path(dual_check)) if dual_check else ["Not run for this card."]
    middle += ["", "## Evaluation", ""]
    table = _eval_lines(Path(evaluation), model_dir) if evaluation else []
    middle += table or ["Not run for this card (`cellduality eval`)."]
    card.write_text(head + "\n".join(middle) + "\n\n## How to use\n" + tail)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cellduality.train.model_card", description=refresh.__doc__)
    p.add_argument("model", help="an SFT or GRPO output folder (holds README.md)")
    p.add_argument(
        "--dual-check", help="the --out folder of `cellduality dual-check` (or its dual_check.json)"
    )
    p.add_argument("--eval", help="an `cellduality eval` report folder (or its metrics.json)")
    a = p.parse_args(argv)
    try:
        card = refresh(a.model, a.dual_check, a.eval)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(f"card updated: {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
