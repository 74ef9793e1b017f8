"""Self-supervised dual-task GRPO (and its oracle ablation) with TRL's ``GRPOTrainer``.

    accelerate launch [--config_file accelerate_configs/zero3.yaml] -m cellduality.train.grpo \\
        --config recipes/llama-3.2-3b/grpo_dual.yaml [--any_field value]
    python -m cellduality.train.grpo --config recipes/tiny-cpu/grpo_dual.yaml

Rewards come from the registry (``reward_funcs`` + ``reward_weights``), each built from the run's one
:class:`~cellduality.rewards.context.RewardContext` (vocabularies, the prepared data as loaded here, the
policy's generation and the frozen reader, the seed). In ``self_supervised`` mode the ground-truth
``answer`` column is removed from the training data before the trainer sees it, and the reward context
holds no prepared data, so no reward can read a label even by mistake.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: columns a self-supervised run removes from its training rows before the trainer sees them
LABEL_COLUMNS = ("answer", "cell_id")


def build_grpo_trainer(cd_args: Any, training_args: Any, model_args: Any):
    """The configured ``GRPOTrainer`` (dual reward wired to the trainer's own generation)."""
    from transformers import set_seed
    from trl import get_peft_config

    from cellduality.rewards import DualReward, RewardContext, build_rewards
    from cellduality.tasks.plan import REFERENCE_TABLE, RL_SPLIT
    from cellduality.train.common import (
        apply_auto_vllm,
        ensure_model,
        load_model_and_tokenizer,
        warn_sentence_mismatch,
    )
    from cellduality.train.configs import check_reward_mode
    from cellduality.train.data import load_task_data, training_rows
    from cellduality.train.generation import PolicyGenerator
    from cellduality.train.head_tiles import lean_head_tiles
    from cellduality.train.launch_guard import check_training_setup
    from cellduality.train.lm_head import compact_lm_head
    from cellduality.train.shared_prompts import SharedPromptGRPOTrainer

    check_reward_mode(cd_args.reward_mode, list(cd_args.reward_funcs))
    compact_lm_head()
    lean_head_tiles()
    set_seed(training_args.seed)
    apply_auto_vllm(cd_args, training_args)
    check_training_setup(training_args)  # ZeRO-3 + HF generation without the gather: refused
    prepared = load_task_data(cd_args, training_args)
    ensure_model(cd_args, model_args.model_name_or_path, prepared, training_args)
    warn_sentence_mismatch(
        model_args.model_name_or_path, prepared.meta, "this GRPO run's data", training_args
    )
    model, tokenizer = load_model_and_tokenizer(model_args, training_args)
    initial = None  # the frozen dual reader, when TRL will make no reference model of its own
    if cd_args.dual_frozen_tasks and training_args.beta == 0.0 and not model_args.use_peft:
        import copy

        initial = copy.deepcopy(model)
    # the paper's design: GRPO's prompts are the RL pool (``rl``), never the SFT set's labelled rows
    pool = RL_SPLIT if RL_SPLIT in prepared.datasets else "train"
    train = training_rows(
        prepared, cd_args.tasks, cd_args.task_weights, cd_args.max_train_examples, training_args.seed, pool
    )
    monitor_dir = None
    if cd_args.monitor_rows > 0:
        from cellduality.train.monitor import MONITOR_DIR, split_monitor_rows

        if pool == RL_SPLIT:  # labelled monitor rows come from the SFT set: the RL pool's labels stay unread
            sft_set = training_rows(prepared, cd_args.tasks, None, None, training_args.seed, "train")
            _, monitor = split_monitor_rows(sft_set, cd_args.monitor_rows, training_args.seed)
        else:
            train, monitor = split_monitor_rows(train, cd_args.monitor_rows, training_args.seed)
        if len(monitor):  # none when no task of the run has a dual (neighbourhood editing alone)
            monitor_dir = Path(training_args.output_dir) / MONITOR_DIR
            with training_args.main_process_first(local=False, desc="writing the monitor split"):
                if training_args.process_index == 0:
                    monitor.save_to_disk(str(monitor_dir))
        del monitor  # only its folder is kept: the trainer holds no labelled rows
    labelled = cd_args.reward_mode != "self_supervised"
    if not labelled:
        # no label reaches a reward: not the answer, not the original cell id (it can encode one), not the
        # RL pool's reference cells; and the reward context below holds no prepared data
        train = train.remove_columns([c for c in LABEL_COLUMNS if c in train.column_names])
        prepared.tables.pop(REFERENCE_TABLE, None)
    generator, reference = (
        PolicyGenerator(
            tokenizer,
            max_new_tokens=cd_args.dual_max_new_tokens,
            do_sample=cd_args.dual_do_sample,
            temperature=cd_args.dual_temperature,
            reader=reader,
        )
        for reader in ("policy", "reference")
    )

    # the run's one reward context: the frozen reader answers the duals of ``dual_frozen_tasks``, the
    # policy every other task's
    context = RewardContext.for_data(
        prepared,
        labelled=labelled,
        generate=generator,
        readers=dict.fromkeys(cd_args.dual_frozen_tasks or (), reference),
        seed=training_args.seed,
    )
    dual_params = {"num_samples": cd_args.dual_num_samples, "deterministic": not cd_args.dual_do_sample}
    rewards = build_rewards(
        cd_args.reward_funcs, context, training_args.reward_weights, params={"dual": dual_params}
    )
    trainer = SharedPromptGRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    generator.trainer = reference.trainer = trainer
    if cd_args.dual_frozen_tasks:
        from cellduality.train.generation import reference_reader

        reference.reference = reference_reader(trainer, initial)
        del initial
    if monitor_dir is not None:
        from cellduality.train.monitor import DualMonitor

        sampler = PolicyGenerator(
            tokenizer,
            max_new_tokens=training_args.max_completion_length,
            do_sample=True,
            temperature=training_args.temperature,
        )
        sampler.trainer = trainer
        dual = next((r for r in rewards if isinstance(r, DualReward)), None)
        if dual is None:  # an oracle run: the monitor still shows what the dual reward would say
            dual = DualReward.from_context(context.without_labels(), deterministic=True)
        monitor_callback = DualMonitor(
            monitor_dir,
            dual,
            sampler,
            context.vocabulary or {},
            group_size=training_args.num_generations,
            every=cd_args.monitor_steps,
        )
        monitor_callback.trainer = trainer  # logs through the trainer's public log
        trainer.add_callback(monitor_callback)
    if cd_args.collapse_ratio > 0 and "format" in cd_args.reward_funcs:
        from cellduality.train.collapse import CollapseGuard

        trainer.add_callback(
            CollapseGuard(training_args.output_dir, ratio=cd_args.collapse_ratio, stop=cd_args.collapse_stop)
        )
    from cellduality.train.progress import use_compact_progress

    use_compact_progress(trainer, training_args.output_dir)
    if training_args.use_vllm:  # a ratio far from 1 in the logs: the engine's weights are stale
        from cellduality.train.monitor import ImportanceRatioWatch

        trainer.add_callback(ImportanceRatioWatch())
    # the run metadata only (genes, fit, split); the rewards' context holds the training splits' labels in a
    # run whose rewards read them, never the test split's, and none in a self-supervised run
    trainer.cellduality_meta = prepared.meta
    del prepared
    trainer.cellduality_dual = next((r for r in rewards if isinstance(r, DualReward)), None)
    from cellduality.train.guards import ZeroVarianceStop  # rewards that never vary: stop, saying why

    trainer.add_callback(ZeroVarianceStop.for_run(cd_args, model_args))
    return trainer


def run_grpo(cd_args: Any, training_args: Any, model_args: Any):
    """Train, resuming from the newest checkpoint of ``output_dir`` if a run was interrupted."""
    from cellduality.modeling.checkpoint import RUN_META, write_run_meta
    from cellduality.modeling.draws import torch_draws
    from cellduality.train.allocator import keep_freed_memory_on_cpu
    from cellduality.train.common import check_resume, last_checkpoint, write_rank_state
    from cellduality.train.sampling import inverse_cdf_sampling

    keep_freed_memory_on_cpu(bool(training_args.use_cpu))
    trainer = build_grpo_trainer(cd_args, training_args, model_args)
    check_resume(training_args.resume_from_checkpoint)
    resume = training_args.resume_from_checkpoint or last_checkpoint(
        training_args.output_dir, main_process=training_args.process_index == 0
    )
    # cpu_sampler: torch (the default) draws torch.multinomial's own tokens with its exponential variates
    # made in bulk (modeling/draws.py); inverse_cdf draws other tokens with one uniform per row
    # (train/sampling.py)
    sampler = cd_args.cpu_sampler
    with inverse_cdf_sampling(sampler == "inverse_cdf"), torch_draws(None if sampler == "torch" else False):
        trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    dual = trainer.cellduality_dual
    if dual is not None:
        rank = trainer.accelerator.process_index
        calls = Path(training_args.output_dir) / f"dual_calls_rank{rank}.json"
        calls.write_text(json.dumps(dual.history))
    counts = {"dual_calls": len(dual.history) if dual else 0}
    if dual is not None:  # the policy's generation calls on this rank, fillers included
        counts["policy_generations"] = getattr(dual.generate, "generations", None)
    write_rank_state(trainer, training_args.output_dir, counts)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)
        write_run_meta(
            training_args.output_dir,
            trainer.cellduality_meta,
            {
                "stage": "grpo",
                "reward_mode": cd_args.reward_mode,
                "reward_funcs": list(cd_args.reward_funcs),
                # what `cellduality predict` generates with by default
                "generation": {"max_new_tokens": training_args.max_completion_length},
            },
        )
        from cellduality.cli_common import saved_to

        print(saved_to("grpo", training_args.output_dir, f"model, tokenizer, {RUN_META}"), flush=True)
    from cellduality.train.model_card import finish_run  # README.md; --push_to_hub through the trainer

    finish_run(trainer, "grpo", cd_args, model_args)
    return trainer


def parse_args(argv: Sequence[str] | None = None):
    from trl import GRPOConfig, ModelConfig, TrlParser

    from cellduality.train.configs import CellDualityArguments

    parser = TrlParser((CellDualityArguments, GRPOConfig, ModelConfig))
    return parser.parse_args_and_config(args=list(argv) if argv is not None else None)


def main(argv: Sequence[str] | None = None, prog: str = "cellduality.train.grpo") -> int:
    """Entry point: a user's mistake (bad data, a refused folder or launch set-up) is one line, exit 2."""
    from cellduality.train.stage import stage_main

    return stage_main("grpo", argv, prog, parse_args, run_grpo)


if __name__ == "__main__":
    sys.exit(main())
