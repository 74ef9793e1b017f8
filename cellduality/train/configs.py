"""Our arguments for the training entry points, parsed by TRL's ``TrlParser`` next to TRL's own.

``TrlParser((CellDualityArguments, GRPOConfig, ModelConfig))`` reads a recipe YAML and any
``--field value`` override. Field names must not collide with TRL's (``HfArgumentParser`` would refuse)
and no field may be called ``config`` (``TrlParser`` uses ``--config`` for the YAML path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

REWARD_MODES = ("self_supervised", "oracle", "combined")
#: ``cpu_sampler`` values: torch's multinomial, or inverse-CDF sampling (``cellduality.train.sampling``)
CPU_SAMPLERS = ("torch", "inverse_cdf")


@dataclass
class CellDualityArguments:
    """Dataset, task mix, rewards and the dual generation of a CellDuality run."""

    dataset: list[str] = field(
        default_factory=lambda: ["pbmc68k"],
        metadata={
            "help": "one or more sources, each a prepared folder (cellduality prepare) or an embedded dataset "
            "name; their tasks are trained together"
        },
    )
    tasks: list[str] | None = field(
        default=None, metadata={"help": "tasks to train on (default: all present)"}
    )
    task_weights: list[float] | None = field(
        default=None, metadata={"help": "relative share of each task in --tasks (resampled with the seed)"}
    )
    sentence_genes: int = field(
        default=100, metadata={"help": "genes per input cell sentence when building from raw data"}
    )
    n_genes: int | None = field(
        default=None, metadata={"help": "genes per generated cell (default: sentence_genes)"}
    )
    max_train_examples: int | None = field(default=None, metadata={"help": "cap on training rows per task"})
    data_split: str = field(default="id", metadata={"help": "id or ood, when building from raw data"})
    sft_examples: int | None = field(
        default=None,
        metadata={
            "help": "when building from raw data: labelled training cells per task in the SFT set; the rest "
            "form the RL pool GRPO trains on (the paper's design; `cellduality prepare --sft-examples`)"
        },
    )
    rl_examples: int | None = field(
        default=None, metadata={"help": "with sft_examples: cap on RL-pool prompt cells per task"}
    )
    prepared_dir: str | None = field(
        default=None,
        metadata={"help": "where to cache examples built from raw data (default: <output_dir>/prepared)"},
    )
    build_tiny_model: bool = field(
        default=False,
        metadata={
            "help": "build the tiny offline model at model_name_or_path if it is not there (tiny-cpu recipes)"
        },
    )
    tiny_hidden_size: int = field(default=64, metadata={"help": "width of the tiny model when it is built"})
    tiny_num_layers: int = field(default=2, metadata={"help": "depth of the tiny model when it is built"})
    tiny_seen_genes_only: bool = field(
        default=False,
        metadata={
            "help": "tiny model vocabulary: only genes that occur in the examples' sentences (a smaller, "
            "faster output layer; genes never seen cannot be generated anyway)"
        },
    )
    reward_mode: str = field(
        default="self_supervised",
        metadata={
            "help": "self_supervised (no labels), oracle (ground truth) or combined; checks reward_funcs"
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["format", "dual"],
        metadata={"help": "registered reward names (cellduality.rewards.REWARDS)"},
    )
    dual_max_new_tokens: int = field(default=64, metadata={"help": "max tokens of a dual completion"})
    dual_do_sample: bool = field(default=False, metadata={"help": "sample dual completions (default greedy)"})
    dual_temperature: float = field(default=1.0, metadata={"help": "temperature when dual_do_sample"})
    dual_num_samples: int = field(
        default=1, metadata={"help": "dual completions averaged per forward completion"}
    )
    dual_frozen_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "tasks whose dual the checkpoint GRPO started from answers, frozen (all: every task); the "
            "others' duals the policy being trained answers (the paper's design). A frozen reader cannot be "
            "taught to agree with the policy; docs/results.md has what each measured"
        },
    )

    monitor_rows: int = field(
        default=0,
        metadata={
            "help": "labelled training rows per task held out as a monitor split: every monitor_steps the "
            "agreement of the dual reward with the truth is logged (monitor/<task>/...); 0 turns it off"
        },
    )
    monitor_steps: int = field(default=10, metadata={"help": "steps between two monitor checks"})
    collapse_ratio: float = field(
        default=0.5,
        metadata={
            "help": "flag a task whose share of parseable answers falls below this fraction of the share GRPO "
            "started with (log, console, <output_dir>/collapse.json); 0 turns the guard off"
        },
    )
    collapse_stop: bool = field(
        default=False, metadata={"help": "stop training when a task collapses (collapse_ratio)"}
    )
    auto_vllm: bool = field(
        default=False, metadata={"help": "turn use_vllm on when vLLM is installed and CUDA is available"}
    )
    cpu_sampler: str = field(
        default="torch",
        metadata={
            "help": "GRPO on the CPU, how a sampled token is drawn: torch (torch.multinomial's own draws, its "
            "exponential variates made in bulk: cellduality.modeling.draws) or inverse_cdf (one uniform per "
            "row: the same distribution, other draws; cellduality.train.sampling). CUDA tensors always use "
            "torch's"
        },
    )
    zero_variance_stop_steps: int = field(
        default=10,
        metadata={
            "help": "GRPO: stop with a diagnosis when no group's reward varied in the first N steps (no "
            "learning signal: e.g. an untrained model whose completions never parse); 0 turns it off"
        },
    )

    def __post_init__(self) -> None:
        if self.cpu_sampler not in CPU_SAMPLERS:
            raise ValueError(
                f"cpu_sampler must be one of {', '.join(CPU_SAMPLERS)}, got {self.cpu_sampler!r}"
            )
        # YAML may give one source as a plain string
        if isinstance(self.dataset, str):
            self.dataset = [d.strip() for d in self.dataset.split(",") if d.strip()]
        if isinstance(self.dual_frozen_tasks, str):
            self.dual_frozen_tasks = [t.strip() for t in self.dual_frozen_tasks.split(",") if t.strip()]
        if self.dual_frozen_tasks:
            from cellduality.data.schema import DataError
            from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS

            known = (*CLASSIFICATION_TASKS, *GENERATION_TASKS)
            wrong = [t for t in self.dual_frozen_tasks if t not in (*known, "all")]
            if wrong:
                raise DataError(
                    f"dual_frozen_tasks: {', '.join(wrong)} has no dual; give some of {', '.join(known)} or all"
                )
            if "all" in self.dual_frozen_tasks:
                self.dual_frozen_tasks = list(known)


def check_reward_mode(mode: str, reward_funcs: list[str]) -> None:
    """Refuse a reward list that contradicts the declared mode (labels in a self-supervised run)."""
    from cellduality.data.schema import DataError  # a recipe mistake: one line, not a traceback
    from cellduality.rewards import REWARDS, USES_LABELS

    if mode not in REWARD_MODES:
        raise DataError(f"reward_mode must be one of {REWARD_MODES}, got {mode!r}")
    unknown = [r for r in reward_funcs if r not in REWARDS]
    if unknown:
        raise DataError(f"unknown reward(s) {unknown}; registered: {', '.join(sorted(REWARDS))}")
    uses_labels = [r for r in reward_funcs if r in USES_LABELS]
    if mode == "self_supervised" and uses_labels:
        raise DataError(
            f"reward_mode self_supervised uses no labels, but reward_funcs has {uses_labels}; "
            "set reward_mode: oracle or combined"
        )
    if mode == "oracle" and "dual" in reward_funcs:
        raise DataError(
            "reward_mode oracle uses ground truth only; remove 'dual' or set reward_mode: combined"
        )
    if mode in ("oracle", "combined") and not uses_labels:
        raise DataError(f"reward_mode {mode} needs a ground-truth reward ({', '.join(sorted(USES_LABELS))})")


@dataclass
class SFTDataArguments:
    """Where the SFT stage finds its teacher-distilled examples."""

    sft_data: str | None = field(
        default=None,
        metadata={
            "help": "folder written by `cellduality sft-data` (default: <output_dir>/sft_data, made with the "
            "offline teacher when missing)"
        },
    )
    sft_limit: int | None = field(
        default=None, metadata={"help": "offline teacher: cap on forward examples per task"}
    )
    sft_concise: bool = field(
        default=False,
        metadata={"help": "offline teacher: short gene-list rationales (what a tiny model can learn)"},
    )
    sft_counterfactuals: int = field(
        default=1,
        metadata={
            "help": "counterfactual dual examples per forward example when SFT data are made here "
            "(cellduality.teacher.counterfactual); 0 turns them off"
        },
    )
    merge_lora: bool = field(
        default=True,
        metadata={"help": "with use_peft: also save the LoRA merged into the base (GRPO loads it)"},
    )
