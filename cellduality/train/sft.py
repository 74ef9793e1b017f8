"""Supervised fine-tuning on teacher-distilled ``<think>/<answer>`` traces with TRL's ``SFTTrainer``.

    accelerate launch [--config_file accelerate_configs/zero3.yaml] -m cellduality.train.sft \\
        --config recipes/llama-3.2-3b/sft.yaml
    python -m cellduality.train.sft --config recipes/tiny-cpu/sft.yaml

The examples are prompt/completion chat pairs written by ``cellduality sft-data`` (forward and dual
examples). When the recipe names none, they are made here with the offline teacher from the training
split, so the tiny recipe runs right after installation. The loss covers the completion only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def sft_examples(cd_args: Any, sft_args: Any, prepared: Any, training_args: Any):
    """The SFT training split, generated with the offline teacher (main process only) if missing."""
    from cellduality.data.schema import DataError
    from cellduality.teacher.pipeline import STORE_FILE, GenerationConfig, load_sft_dataset, run_generation

    folder = Path(sft_args.sft_data or Path(training_args.output_dir) / "sft_data")
    # a folder the user names, where `sft-data` stopped (attempts, no dataset), is theirs to resume: the
    # offline teacher must not finish a hosted teacher's run in it
    stopped = sft_args.sft_data and (folder / STORE_FILE).exists() and not (folder / "dataset").exists()
    with training_args.main_process_first(local=False, desc="making SFT data with the offline teacher"):
        if not stopped and not (folder / "dataset").exists() and training_args.process_index == 0:
            prepared_dir = Path(training_args.output_dir) / "prepared"
            if not (prepared_dir / "meta.json").exists():
                from cellduality.tasks import save_prepared

                save_prepared(prepared, prepared_dir)
            run_generation(
                GenerationConfig(
                    data=str(prepared_dir),
                    tasks=cd_args.tasks,
                    out=str(folder),
                    limit=sft_args.sft_limit,
                    seed=training_args.seed,
                    offline_concise=sft_args.sft_concise,
                    counterfactuals=sft_args.sft_counterfactuals,
                    progress=training_args.process_index == 0,
                )
            )
        try:
            train = load_sft_dataset(folder)["train"]
        except FileNotFoundError as exc:  # a stopped `sft-data` run in the folder the user named
            raise DataError(str(exc)) from exc
    return train


def run_sft(cd_args: Any, sft_args: Any, training_args: Any, model_args: Any):
    """Train, resuming from the newest checkpoint; save the model (LoRA merged if asked) and run meta."""
    from transformers import set_seed
    from trl import SFTTrainer, get_peft_config

    from cellduality.modeling.checkpoint import RUN_META, write_run_meta
    from cellduality.train.allocator import keep_freed_memory_on_cpu
    from cellduality.train.common import (
        check_resume,
        ensure_model,
        last_checkpoint,
        load_model_and_tokenizer,
        write_rank_state,
    )
    from cellduality.train.data import load_task_data
    from cellduality.train.head_tiles import lean_head_tiles
    from cellduality.train.lm_head import compact_lm_head

    keep_freed_memory_on_cpu(bool(training_args.use_cpu))
    compact_lm_head()
    lean_head_tiles()
    set_seed(training_args.seed)
    prepared = load_task_data(cd_args, training_args)
    ensure_model(cd_args, model_args.model_name_or_path, prepared, training_args)
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    train = sft_examples(cd_args, sft_args, prepared, training_args)
    if cd_args.tasks:
        train = train.filter(lambda r: r["task"] in cd_args.tasks)
    train = train.select_columns(["prompt", "completion"])
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    from cellduality.train.progress import use_compact_progress

    use_compact_progress(trainer, training_args.output_dir)
    check_resume(training_args.resume_from_checkpoint)
    resume = training_args.resume_from_checkpoint or last_checkpoint(
        training_args.output_dir, main_process=training_args.process_index == 0
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    write_rank_state(trainer, training_args.output_dir)
    if trainer.accelerator.is_main_process:
        out = Path(training_args.output_dir)
        if model_args.use_peft and sft_args.merge_lora:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(out / "merged")
            tokenizer.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out)
        write_run_meta(str(out), prepared, {"stage": "sft", "examples": len(train)})
        from cellduality.cli_common import saved_to

        print(saved_to("sft", out, f"model, tokenizer, {RUN_META}"), flush=True)
    from cellduality.train.model_card import finish_run  # README.md; --push_to_hub through the trainer

    finish_run(trainer, "sft", cd_args, model_args)
    return trainer


def parse_args(argv: Sequence[str] | None = None):
    from trl import ModelConfig, SFTConfig, TrlParser

    from cellduality.train.configs import CellDualityArguments, SFTDataArguments

    parser = TrlParser((CellDualityArguments, SFTDataArguments, SFTConfig, ModelConfig))
    return parser.parse_args_and_config(args=list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None, prog: str = "cellduality.train.sft") -> int:
    """Entry point: a user's mistake (bad data, a refused folder or launch set-up) is one line, exit 2."""
    from cellduality.train.stage import stage_main

    return stage_main("sft", argv, prog, parse_args, run_sft)


if __name__ == "__main__":
    sys.exit(main())
