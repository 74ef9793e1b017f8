"""Refuse launch set-ups that accelerate accepts but that silently do something other than asked.

On a machine without CUDA, accelerate 1.15 does not fail for any of these (each one measured with
``accelerate launch`` on a 2-core CPU machine):

* a DeepSpeed config starts DeepSpeed on CPU ranks (gloo), slowly, with no hint that the GPUs are missing;
* an 8-process GPU config starts 8 CPU ranks;
* ``--cpu`` together with a DeepSpeed config drops DeepSpeed without a word (and keeps its ``bf16``);
* ``--cpu --num_processes N``, ``--num_processes N`` without ``--multi_gpu``, or a ``MULTI_CPU`` config
  without MPI runs ONE process.

:func:`check_launch_environment` is called first thing by the training entry points and raises
:class:`LaunchError` with the fix in its message. Tests that really want CPU ranks opt in with
``CELLDUALITY_ALLOW_CPU_DEEPSPEED=1`` (DeepSpeed on CPU, which implies several CPU ranks) or
``CELLDUALITY_ALLOW_CPU_MULTIPROCESS=1`` (plain DDP over gloo).

:func:`validate_accelerate_config` checks an accelerate YAML: accelerate rejects unknown top-level keys
itself, but copies every key under ``deepspeed_config`` onto its argument namespace without checking it,
so a typo there (``offload_optimizer_devices``) is silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Opt-in: run DeepSpeed on CPU ranks (tests of the DeepSpeed code paths on CPU machines).
ALLOW_CPU_DEEPSPEED_ENV = "CELLDUALITY_ALLOW_CPU_DEEPSPEED"
#: Opt-in: run several CPU ranks without DeepSpeed (``accelerate launch --multi_gpu --num_processes 2``).
ALLOW_CPU_MULTIPROCESS_ENV = "CELLDUALITY_ALLOW_CPU_MULTIPROCESS"

#: Keys accelerate understands inside ``deepspeed_config`` (the "DeepSpeed Arguments" of
#: ``accelerate launch``, accelerate 1.15). A test compares this with the installed accelerate.
DEEPSPEED_CONFIG_KEYS: frozenset[str] = frozenset(
    {
        "deepspeed_config_file",
        "zero_stage",
        "offload_optimizer_device",
        "offload_param_device",
        "offload_optimizer_nvme_path",
        "offload_param_nvme_path",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero3_init_flag",
        "zero3_save_16bit_model",
        "deepspeed_hostfile",
        "deepspeed_exclusion_filter",
        "deepspeed_inclusion_filter",
        "deepspeed_multinode_launcher",
        "deepspeed_moe_layer_cls_names",
    }
)
#: Keys that accelerate refuses next to ``deepspeed_config_file`` (the file must hold them instead).
_DS_KEYS_CONFLICTING_WITH_FILE = frozenset(
    {
        "zero_stage",
        "offload_optimizer_device",
        "offload_param_device",
        "offload_optimizer_nvme_path",
        "offload_param_nvme_path",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "zero3_save_16bit_model",
    }
)
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")
_MIXED_PRECISION = ("no", "fp16", "bf16", "fp8")
_FIX_DEEPSPEED = (
    "DeepSpeed needs CUDA GPUs. On this machine use `accelerate launch --config_file accelerate_configs/cpu.yaml ...` "
    "(one CPU process), or `accelerate launch --multi_gpu --num_processes 2 ...` for two CPU ranks. "
    f"To exercise DeepSpeed on CPU on purpose (tests), set {ALLOW_CPU_DEEPSPEED_ENV}=1 and pass "
    "`--num_processes 2 --mixed_precision no`."
)


class LaunchError(RuntimeError):
    """A launch set-up that would run, but not the way it was asked for; the message says how to fix it."""


@dataclass(frozen=True)
class LaunchEnvironment:
    """What the guard found, for the training entry points to log."""

    world_size: int
    local_world_size: int
    rank: int
    cuda_available: bool
    use_deepspeed: bool
    zero_stage: int | None
    use_cpu: bool
    config_file: str | None = None
    overrides: tuple[str, ...] = field(default_factory=tuple)


def _truthy(value: str | None) -> bool:
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _int(value: str | None, default: int) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return default


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _cuda_device_count() -> int:
    import torch

    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _state_uses_deepspeed() -> bool:
    """Whether an already created ``AcceleratorState`` runs DeepSpeed (without creating one)."""
    try:
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return False
    shared = getattr(AcceleratorState, "_shared_state", {}) or {}
    return shared.get("distributed_type") == DistributedType.DEEPSPEED


def _launcher_argv() -> list[str] | None:
    """The command line of the ``accelerate launch`` that started this process, when one did.

    accelerate passes no trace of ``--cpu`` + ``--config_file`` to the script it starts, so the guard
    reads its parent's (or grand-parent's) command line. ``None`` off Linux or outside accelerate.
    """
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None
    try:
        proc = psutil.Process(os.getpid()).parent()
        for _ in range(3):
            if proc is None:
                return None
            argv = proc.cmdline()
            if _is_accelerate_launch(argv):
                return argv
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def _is_accelerate_launch(argv: Sequence[str]) -> bool:
    names = [Path(a).name for a in argv[:4]]
    if any(n in {"accelerate-launch", "accelerate.commands.launch"} for n in names):
        return True
    return any(n == "accelerate" or n.startswith("accelerate.") for n in names) and "launch" in argv[:5]


def parse_launcher_args(argv: Sequence[str]) -> dict[str, Any]:
    """The ``accelerate launch`` options the guard needs: ``config_file``, ``num_processes``, ``cpu``, ...

    Parsed with accelerate's own ``launch`` parser, so every option (``--mixed_precision no`` included)
    is read as accelerate reads it and the training script's own arguments are never mistaken for the
    launcher's. An argv the parser refuses gives the defaults.
    """
    from accelerate.commands.launch import launch_command_parser

    found: dict[str, Any] = {"config_file": None, "num_processes": None, "cpu": False, "use_deepspeed": False}
    args = list(argv)
    start = next(
        (
            i + 1
            for i, a in enumerate(args)
            if a == "launch" or Path(a).name in {"accelerate-launch", "accelerate.commands.launch"}
        ),
        None,
    )
    if start is None:
        return found
    try:
        parsed, _ = launch_command_parser().parse_known_args(args[start:])
    except SystemExit:  # argparse reports errors by exiting
        return found
    found["config_file"] = parsed.config_file
    found["num_processes"] = parsed.num_processes
    found["cpu"] = bool(parsed.cpu)
    found["use_deepspeed"] = bool(parsed.use_deepspeed)
    return found


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    return data if isinstance(data, dict) else {}


def check_launch_environment(
    env: Mapping[str, str] | None = None,
    *,
    cuda_available: bool | None = None,
    cuda_device_count: int | None = None,
    launcher_argv: Sequence[str] | None = None,
) -> LaunchEnvironment:
    """Raise :class:`LaunchError` for launch set-ups that silently run differently from what was asked.

    Call it at the very start of a training entry point, before the trainer (and so DeepSpeed) starts.
    The keyword arguments exist for tests; by default the real environment, CUDA and the launching
    ``accelerate launch`` command line are inspected. Checks, in order:

    1. ``--cpu`` with a DeepSpeed config (accelerate drops DeepSpeed, keeps bf16) - always refused;
    2. ``--cpu``/``MULTI_CPU`` asking for several processes while only one runs - always refused;
    3. DeepSpeed without CUDA - refused unless ``CELLDUALITY_ALLOW_CPU_DEEPSPEED=1``;
    4. several ranks without CUDA (an 8-GPU config on a laptop) - refused unless
       ``CELLDUALITY_ALLOW_CPU_MULTIPROCESS=1`` (or the DeepSpeed opt-in);
    5. more local ranks than visible GPUs - refused (accelerate would fail later with
       "invalid device ordinal").
    """
    env = os.environ if env is None else env
    cuda = _cuda_available() if cuda_available is None else cuda_available
    if launcher_argv is None and ("ACCELERATE_USE_CPU" in env or "ACCELERATE_MIXED_PRECISION" in env):
        launcher_argv = _launcher_argv()
    launcher = parse_launcher_args(launcher_argv) if launcher_argv else {}
    config_file = launcher.get("config_file")
    config: dict[str, Any] = {}
    if config_file:
        try:
            config = _read_yaml(config_file)
        except OSError:
            config = {}

    world_size = _int(env.get("WORLD_SIZE"), 1)
    local_world_size = _int(env.get("LOCAL_WORLD_SIZE"), world_size)
    rank = _int(env.get("RANK"), 0)
    use_cpu = _truthy(env.get("ACCELERATE_USE_CPU")) or launcher.get("cpu", False)
    use_deepspeed = _truthy(env.get("ACCELERATE_USE_DEEPSPEED")) or _state_uses_deepspeed()
    zero_stage = _int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), -1)
    allow_ds = _truthy(env.get(ALLOW_CPU_DEEPSPEED_ENV))
    allow_mp = _truthy(env.get(ALLOW_CPU_MULTIPROCESS_ENV)) or allow_ds
    overrides = tuple(
        name
        for name, on in ((ALLOW_CPU_DEEPSPEED_ENV, allow_ds), (ALLOW_CPU_MULTIPROCESS_ENV, allow_mp))
        if on
    )
    where = f" (config file: {config_file})" if config_file else ""

    # 1. --cpu + DeepSpeed config: accelerate's simple launcher ignores the DeepSpeed section.
    config_is_deepspeed = str(config.get("distributed_type", "")).upper() == "DEEPSPEED"
    if use_cpu and not use_deepspeed and config_is_deepspeed:
        raise LaunchError(
            f"`accelerate launch --cpu` was given a DeepSpeed config{where}: accelerate silently drops DeepSpeed "
            f"(and keeps the config's mixed_precision={config.get('mixed_precision')!r}) and runs one plain process. "
            "On a GPU machine drop `--cpu`; on a CPU machine use `--config_file accelerate_configs/cpu.yaml`, or "
            f"(tests) {ALLOW_CPU_DEEPSPEED_ENV}=1 with `--num_processes 2 --mixed_precision no` and no `--cpu`."
        )

    # 2. --cpu / MULTI_CPU with N > 1 processes: the simple launcher starts exactly one.
    # accelerate's simple launcher is the only one that sets ACCELERATE_USE_CPU, and it sets MASTER_ADDR only
    # when more than one process was asked for; torchrun (multi-GPU, DeepSpeed) sets WORLD_SIZE instead.
    asked = launcher.get("num_processes") or _int(config.get("num_processes"), 0)
    simple_launcher = "ACCELERATE_USE_CPU" in env and "WORLD_SIZE" not in env and "RANK" not in env
    mpi = any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK"))
    if simple_launcher and not mpi and (asked > 1 or (not asked and "MASTER_ADDR" in env)):
        n = asked if asked > 1 else "several"
        raise LaunchError(
            f"accelerate was asked for {n} processes{where} but runs ONE: without GPUs, `--num_processes N` "
            "without `--multi_gpu`, `--cpu --num_processes N` and MULTI_CPU configs without MPI all start a single "
            "process. For N real CPU ranks (gloo) use "
            f"`accelerate launch --multi_gpu --num_processes N ...` with {ALLOW_CPU_MULTIPROCESS_ENV}=1; for one "
            "process use `--config_file accelerate_configs/cpu.yaml`."
        )

    # 3. DeepSpeed without CUDA.
    if use_deepspeed and not cuda and not allow_ds:
        stage = f" ZeRO-{zero_stage}" if zero_stage >= 0 else ""
        raise LaunchError(
            f"DeepSpeed{stage} was requested{where} but this machine has no CUDA GPU: accelerate would start "
            f"{world_size} DeepSpeed rank(s) on the CPU instead of failing. " + _FIX_DEEPSPEED
        )

    # 4. Several ranks without CUDA: typically an 8-GPU config run on a CPU machine.
    if world_size > 1 and not cuda and not allow_mp:
        raise LaunchError(
            f"accelerate started {world_size} processes{where} but this machine has no CUDA GPU: a multi-GPU config "
            f"(accelerate_configs/ddp.yaml, zero2.yaml, zero3.yaml ask for 8) runs {world_size} CPU ranks instead of "
            "failing. Use `accelerate launch --config_file accelerate_configs/cpu.yaml ...` for one CPU process, or set "
            f"{ALLOW_CPU_MULTIPROCESS_ENV}=1 to run several CPU ranks on purpose."
        )

    # 5. More local ranks than GPUs: accelerate would fail later with an obscure device-ordinal error.
    if cuda and not use_cpu:
        n_gpus = _cuda_device_count() if cuda_device_count is None else cuda_device_count
        if 0 < n_gpus < local_world_size:
            raise LaunchError(
                f"accelerate started {local_world_size} processes on this machine{where} but only {n_gpus} GPU(s) are "
                f"visible: pass `--num_processes {n_gpus}` (the accelerate configs default to 8)."
            )

    return LaunchEnvironment(
        world_size=world_size,
        local_world_size=local_world_size,
        rank=rank,
        cuda_available=cuda,
        use_deepspeed=use_deepspeed,
        zero_stage=zero_stage if zero_stage >= 0 else None,
        use_cpu=use_cpu,
        config_file=config_file,
        overrides=overrides,
    )


def skip_deepspeed_cpu_shm_kernel(environment: LaunchEnvironment) -> bool:
    """On DeepSpeed's CPU path (the tests' opt-in), do not build its shared-memory all-reduce kernel.

    DeepSpeed's communication back-end compiles ``deepspeed_shm_comm`` (a C++ extension, about 25 s on 2
    cores, again for every new environment) when it starts on a CPU. Only its tensor-parallel inference
    all-reduce uses the kernel; ZeRO's collectives go through ``torch.distributed`` (gloo) either way, and
    without the kernel DeepSpeed falls back to ``torch.distributed`` there too. Marking the op incompatible
    in DeepSpeed's own table (which its ``build_shm_op`` reads) makes it skip the build. Returns whether
    it did; never on a CUDA machine.
    """
    if not environment.use_deepspeed or environment.cuda_available:
        return False
    try:
        import deepspeed.ops
    except ImportError:
        return False
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return True


def validate_accelerate_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load an accelerate YAML config and raise ``ValueError`` listing every problem found; return the dict.

    Checks what accelerate checks (top-level keys against its config dataclass, ``distributed_type`` and
    ``mixed_precision`` values) and what it does not: every key and value under ``deepspeed_config``,
    a ``deepspeed_config`` section that would be ignored (``distributed_type`` is not ``DEEPSPEED``),
    ZeRO-3-only keys under another stage, and keys that accelerate refuses next to ``deepspeed_config_file``.
    """
    from accelerate.commands.config.config_args import ClusterConfig, SageMakerConfig
    from accelerate.utils import DistributedType

    path = Path(path)
    problems: list[str] = []
    try:
        config = _read_yaml_strict(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc

    compute = str(config.get("compute_environment", "LOCAL_MACHINE"))
    config_class = ClusterConfig if compute == "LOCAL_MACHINE" else SageMakerConfig
    # Keys accelerate converts on load (BaseConfig.process_config) before its own unknown-key check.
    legacy = {"fp16", "dynamo_backend"}
    unknown = sorted(set(config) - set(config_class.__dataclass_fields__) - legacy)
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown} (accelerate refuses them)")

    distributed = str(config.get("distributed_type", ""))
    if "distributed_type" not in config:
        problems.append("`distributed_type` is missing (accelerate requires it)")
    elif distributed not in {d.value for d in DistributedType}:
        problems.append(
            f"distributed_type {distributed!r} is not one of {sorted(d.value for d in DistributedType)}"
        )

    mixed = config.get("mixed_precision")
    if mixed is not None and str(mixed).lower() not in _MIXED_PRECISION:
        problems.append(f"mixed_precision {mixed!r} is not one of {list(_MIXED_PRECISION)}")
    n_proc = config.get("num_processes")
    if n_proc is not None and (not isinstance(n_proc, int) or isinstance(n_proc, bool) or n_proc < 1):
        problems.append(f"num_processes must be a positive integer, got {n_proc!r}")

    ds = config.get("deepspeed_config") or {}
    if not isinstance(ds, dict):
        problems.append(f"deepspeed_config must be a mapping, got {type(ds).__name__}")
        ds = {}
    if ds and distributed != "DEEPSPEED":
        problems.append(
            f"deepspeed_config is ignored because distributed_type is {distributed!r}, not 'DEEPSPEED'"
        )
    if ds or distributed == "DEEPSPEED":
        problems.extend(_deepspeed_problems(ds))

    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{path} is not a valid accelerate config:\n{listing}")
    return config


def _read_yaml_strict(path: Path) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"expected a mapping at the top level, got {type(data).__name__}")
    return data


def _deepspeed_problems(ds: Mapping[str, Any]) -> list[str]:
    """Problems inside a ``deepspeed_config`` section (accelerate itself checks none of these)."""
    from accelerate.utils.constants import DEEPSPEED_MULTINODE_LAUNCHERS

    problems: list[str] = []
    unknown = sorted(set(ds) - DEEPSPEED_CONFIG_KEYS)
    if unknown:
        problems.append(
            f"unknown deepspeed_config key(s) {unknown}: accelerate would silently ignore them; "
            f"known keys: {sorted(DEEPSPEED_CONFIG_KEYS)}"
        )
    stage = ds.get("zero_stage")
    if stage is not None and (isinstance(stage, bool) or stage not in (0, 1, 2, 3)):
        problems.append(f"deepspeed_config.zero_stage must be 0, 1, 2 or 3, got {stage!r}")
    for key in ("offload_optimizer_device", "offload_param_device"):
        value = ds.get(key)
        if value is not None and str(value).lower() not in _OFFLOAD_DEVICES:
            problems.append(f"deepspeed_config.{key} must be one of {list(_OFFLOAD_DEVICES)}, got {value!r}")
    if str(ds.get("offload_param_device", "none")).lower() != "none" and stage is not None and stage != 3:
        problems.append("deepspeed_config.offload_param_device only works with zero_stage 3")
    for key in ("zero3_init_flag", "zero3_save_16bit_model"):
        value = ds.get(key)
        if value is not None and not isinstance(value, bool):
            problems.append(f"deepspeed_config.{key} must be true or false, got {value!r}")
    if ds.get("zero3_save_16bit_model") and stage is not None and stage != 3:
        problems.append("deepspeed_config.zero3_save_16bit_model only applies to zero_stage 3")
    clip = ds.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        problems.append(f"deepspeed_config.gradient_clipping must be a non-negative number, got {clip!r}")
    steps = ds.get("gradient_accumulation_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        problems.append(
            f"deepspeed_config.gradient_accumulation_steps must be a positive integer, got {steps!r}"
        )
    launcher = ds.get("deepspeed_multinode_launcher")
    if launcher is not None and launcher not in DEEPSPEED_MULTINODE_LAUNCHERS:
        problems.append(
            f"deepspeed_config.deepspeed_multinode_launcher must be one of {list(DEEPSPEED_MULTINODE_LAUNCHERS)}"
        )
    if ds.get("deepspeed_config_file"):
        clash = sorted(set(ds) & _DS_KEYS_CONFLICTING_WITH_FILE)
        if clash:
            problems.append(
                f"deepspeed_config keys {clash} cannot be combined with deepspeed_config_file "
                "(accelerate refuses them at launch): put them in the DeepSpeed JSON file"
            )
    elif stage is None:
        problems.append("deepspeed_config needs zero_stage (or a deepspeed_config_file)")
    return problems


def deepspeed_zero_stage(training_args: Any = None, env: Mapping[str, str] | None = None) -> int | None:
    """The ZeRO stage this run trains with (``None`` without DeepSpeed), from the launcher or the args.

    ``accelerate launch`` with a DeepSpeed config exports ``ACCELERATE_DEEPSPEED_ZERO_STAGE``; a
    ``deepspeed`` JSON given to the trainer arguments is read by transformers into ``hf_deepspeed_config``.
    """
    env = os.environ if env is None else env
    if _truthy(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage = _int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"), -1)
        if stage >= 0:
            return stage
    ds_config = getattr(training_args, "hf_deepspeed_config", None)
    if ds_config is not None:
        return 3 if ds_config.is_zero3() else int(ds_config.get_value("zero_optimization.stage") or 0)
    return None


def check_generation_setup(use_vllm: bool, ds3_gather_for_generation: bool, zero_stage: int | None) -> None:
    """Refuse ``ds3_gather_for_generation: false`` under ZeRO-3 when generation runs in Hugging Face.

    Without the gather, every generated token of every rollout and every dual answer all-gathers each
    layer's shards across the ranks: TRL's maintainers measured step 0 "stuck" for hours and closed it
    as intended behaviour (huggingface/trl#3858). vLLM generation does not read this flag (its weight
    push gathers one parameter at a time), so only the Hugging Face path is refused.
    """
    if zero_stage == 3 and not use_vllm and not ds3_gather_for_generation:
        raise LaunchError(
            "ds3_gather_for_generation: false under DeepSpeed ZeRO-3 with Hugging Face generation makes every "
            "generated token gather the model's shards across ranks (hours per step, huggingface/trl#3858): "
            "drop the setting (TRL's default is true), or generate with vLLM (use_vllm: true)"
        )


def check_training_setup(training_args: Any, env: Mapping[str, str] | None = None) -> None:
    """The checks of a parsed GRPO configuration (after ``auto_vllm`` decided ``use_vllm``)."""
    check_generation_setup(
        bool(getattr(training_args, "use_vllm", False)),
        bool(getattr(training_args, "ds3_gather_for_generation", True)),
        deepspeed_zero_stage(training_args, env),
    )
