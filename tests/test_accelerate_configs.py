"""accelerate_configs/*.yaml and the launch guard (cellduality.train.launch_guard).

accelerate 1.15 validates top-level config keys but not those under ``deepspeed_config``, and on a
machine without CUDA it runs DeepSpeed and 8-GPU configs on CPU ranks without complaint: these tests pin
the checks that close those gaps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cellduality.train.launch_guard import (
    ALLOW_CPU_DEEPSPEED_ENV,
    ALLOW_CPU_MULTIPROCESS_ENV,
    DEEPSPEED_CONFIG_KEYS,
    LaunchError,
    _is_accelerate_launch,
    check_launch_environment,
    parse_launcher_args,
    validate_accelerate_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "accelerate_configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
#: Variables the guard reads; cleared so the test process's own environment cannot leak in.
LAUNCH_VARS = (
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "RANK",
    "MASTER_ADDR",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_USE_DEEPSPEED",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE",
    "ACCELERATE_MIXED_PRECISION",
    ALLOW_CPU_DEEPSPEED_ENV,
    ALLOW_CPU_MULTIPROCESS_ENV,
)


@pytest.fixture
def launch_env(monkeypatch):
    """A clean launch environment; returns ``setenv`` for the variables a launcher would set."""
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch.setenv


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _zero2() -> dict:
    return yaml.safe_load((CONFIG_DIR / "zero2.yaml").read_text(encoding="utf-8"))


# --- the shipped configs ---------------------------------------------------------------------------


def test_expected_configs_exist():
    assert {p.name for p in CONFIGS} >= {"ddp.yaml", "zero2.yaml", "zero3.yaml", "cpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_accelerate_loads_it(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = validate_accelerate_config(path)
    loaded = load_config_from_file(str(path))
    assert loaded.num_processes == config["num_processes"]


@pytest.mark.parametrize("name", ["ddp.yaml", "zero2.yaml", "zero3.yaml"])
def test_gpu_configs_are_8_process_bf16(name):
    config = validate_accelerate_config(CONFIG_DIR / name)
    assert config["num_processes"] == 8
    assert config["mixed_precision"] == "bf16"
    assert config["use_cpu"] is False


@pytest.mark.parametrize(("name", "stage"), [("zero2.yaml", 2), ("zero3.yaml", 3)])
def test_zero_configs(name, stage):
    config = validate_accelerate_config(CONFIG_DIR / name)
    ds = config["deepspeed_config"]
    assert config["distributed_type"] == "DEEPSPEED"
    assert ds["zero_stage"] == stage
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    assert ds["zero3_init_flag"] is (stage == 3)
    if stage == 3:
        assert ds["zero3_save_16bit_model"] is True
    # Left to the recipe on purpose: a value here makes transformers refuse any recipe whose max_grad_norm /
    # gradient_accumulation_steps differ ("ds gradient_clipping=1.0 vs hf max_grad_norm=0.5").
    assert "gradient_clipping" not in ds
    assert "gradient_accumulation_steps" not in ds


def test_cpu_config_is_one_full_precision_process():
    config = validate_accelerate_config(CONFIG_DIR / "cpu.yaml")
    assert config["num_processes"] == 1
    assert config["mixed_precision"] == "no"
    assert config["use_cpu"] is True
    assert config["distributed_type"] == "NO"


def test_deepspeed_allow_list_matches_installed_accelerate():
    """The allow-list is accelerate's own "DeepSpeed Arguments"; fails when an accelerate upgrade changes them."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    groups = [g for g in parser._action_groups if g.title == "DeepSpeed Arguments"]
    assert groups, "accelerate's launch parser has no 'DeepSpeed Arguments' group any more"
    dests = {a.dest for a in groups[0]._group_actions} - {"use_deepspeed"}
    assert dests == DEEPSPEED_CONFIG_KEYS


# --- invalid configs are refused -------------------------------------------------------------------


def test_unknown_deepspeed_key_is_rejected(tmp_path):
    config = _zero2()
    config["deepspeed_config"]["offload_optimizer_devices"] = "cpu"  # typo: accelerate would ignore it
    with pytest.raises(ValueError, match="offload_optimizer_devices"):
        validate_accelerate_config(_write(tmp_path, config))


def test_unknown_top_level_key_is_rejected(tmp_path):
    config = _zero2()
    config["num_gpus"] = 8
    with pytest.raises(ValueError, match="num_gpus"):
        validate_accelerate_config(_write(tmp_path, config))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"zero_stage": 4}, "zero_stage"),
        ({"offload_param_device": "gpu"}, "offload_param_device"),
        ({"zero3_save_16bit_model": True}, "only applies to zero_stage 3"),
        ({"zero3_init_flag": "yes"}, "zero3_init_flag"),
        ({"deepspeed_config_file": "ds.json"}, "cannot be combined with deepspeed_config_file"),
        ({"gradient_clipping": -1}, "gradient_clipping"),
    ],
)
def test_bad_deepspeed_values_are_rejected(tmp_path, edit, message):
    config = _zero2()
    config["deepspeed_config"].update(edit)
    with pytest.raises(ValueError, match=message):
        validate_accelerate_config(_write(tmp_path, config))


def test_deepspeed_section_without_deepspeed_is_rejected(tmp_path):
    config = _zero2()
    config["distributed_type"] = "MULTI_GPU"
    with pytest.raises(ValueError, match="ignored"):
        validate_accelerate_config(_write(tmp_path, config))


def test_all_problems_are_listed_at_once(tmp_path):
    config = _zero2()
    config["mixed_precision"] = "bf32"
    config["deepspeed_config"]["zero_stagee"] = 3
    with pytest.raises(ValueError) as info:
        validate_accelerate_config(_write(tmp_path, config))
    assert "bf32" in str(info.value) and "zero_stagee" in str(info.value)


def test_non_mapping_yaml_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        validate_accelerate_config(path)


# --- the launch guard ------------------------------------------------------------------------------


def test_guard_refuses_deepspeed_without_cuda(launch_env):
    launch_env("ACCELERATE_USE_DEEPSPEED", "true")
    launch_env("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    launch_env("WORLD_SIZE", "2")
    with pytest.raises(LaunchError) as info:
        check_launch_environment(cuda_available=False, launcher_argv=[])
    message = str(info.value)
    assert "ZeRO-3" in message and "no CUDA" in message
    assert "accelerate_configs/cpu.yaml" in message and ALLOW_CPU_DEEPSPEED_ENV in message


def test_guard_passes_deepspeed_without_cuda_with_override(launch_env):
    launch_env("ACCELERATE_USE_DEEPSPEED", "true")
    launch_env("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    launch_env("WORLD_SIZE", "2")
    launch_env(ALLOW_CPU_DEEPSPEED_ENV, "1")
    found = check_launch_environment(cuda_available=False, launcher_argv=[])
    assert found.use_deepspeed and found.zero_stage == 2 and found.world_size == 2
    assert ALLOW_CPU_DEEPSPEED_ENV in found.overrides


def test_guard_passes_deepspeed_with_cuda(launch_env):
    launch_env("ACCELERATE_USE_DEEPSPEED", "true")
    launch_env("WORLD_SIZE", "8")
    launch_env("LOCAL_WORLD_SIZE", "8")
    found = check_launch_environment(cuda_available=True, cuda_device_count=8, launcher_argv=[])
    assert found.use_deepspeed and found.cuda_available


def test_guard_refuses_8_processes_on_cpu(launch_env):
    launch_env("WORLD_SIZE", "8")
    launch_env("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(LaunchError, match="8 processes"):
        check_launch_environment(cuda_available=False, launcher_argv=[])
    launch_env(ALLOW_CPU_MULTIPROCESS_ENV, "1")
    assert check_launch_environment(cuda_available=False, launcher_argv=[]).world_size == 8


def test_guard_refuses_more_ranks_than_gpus(launch_env):
    launch_env("WORLD_SIZE", "8")
    launch_env("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(LaunchError, match="--num_processes 2"):
        check_launch_environment(cuda_available=True, cuda_device_count=2, launcher_argv=[])


def test_guard_refuses_cpu_flag_with_deepspeed_config(launch_env):
    """`accelerate launch --cpu --config_file zero2.yaml` silently drops DeepSpeed: the guard must say so."""
    launch_env("ACCELERATE_USE_CPU", "True")
    launch_env("MASTER_ADDR", "127.0.0.1")
    argv = ["accelerate", "launch", "--cpu", "--config_file", str(CONFIG_DIR / "zero2.yaml"), "train.py"]
    with pytest.raises(LaunchError, match="silently drops DeepSpeed"):
        check_launch_environment(cuda_available=False, launcher_argv=argv)


def test_guard_refuses_cpu_flag_with_several_processes(launch_env):
    """`accelerate launch --cpu --num_processes 2` runs ONE process."""
    launch_env("ACCELERATE_USE_CPU", "True")
    launch_env("MASTER_ADDR", "127.0.0.1")
    argv = ["accelerate", "launch", "--cpu", "--num_processes", "2", "train.py"]
    with pytest.raises(LaunchError, match="runs ONE"):
        check_launch_environment(cuda_available=False, launcher_argv=argv)


def test_guard_passes_cpu_config_and_plain_python(launch_env):
    assert check_launch_environment(cuda_available=False, launcher_argv=[]).world_size == 1
    launch_env("ACCELERATE_USE_CPU", "True")
    argv = [
        "accelerate",
        "launch",
        "--config_file",
        str(CONFIG_DIR / "cpu.yaml"),
        "-m",
        "cellduality.train.sft",
    ]
    found = check_launch_environment(cuda_available=False, launcher_argv=argv)
    assert found.use_cpu and not found.use_deepspeed and found.config_file.endswith("cpu.yaml")


def test_guard_passes_two_cpu_ranks_with_opt_in(launch_env):
    """What the distributed tests run: `accelerate launch --multi_gpu --num_processes 2` on CPU."""
    launch_env("WORLD_SIZE", "2")
    launch_env("LOCAL_WORLD_SIZE", "2")
    launch_env(ALLOW_CPU_MULTIPROCESS_ENV, "1")
    assert check_launch_environment(cuda_available=False, launcher_argv=[]).world_size == 2


def test_guard_accepts_explicit_env_mapping():
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}
    with pytest.raises(LaunchError):
        check_launch_environment(env, cuda_available=False, launcher_argv=[])


def test_parse_launcher_args_stops_at_the_script():
    argv = [
        "/venv/bin/accelerate",
        "launch",
        "--mixed_precision",
        "no",
        "--config_file=z.yaml",
        "--num_processes",
        "2",
        "x.py",
        "--cpu",
    ]
    assert parse_launcher_args(argv) == {
        "config_file": "z.yaml",
        "num_processes": 2,
        "cpu": False,
        "use_deepspeed": False,
    }
    module = ["accelerate", "launch", "--cpu", "-m", "cellduality.train.sft", "--config_file", "r.yaml"]
    assert parse_launcher_args(module)["cpu"] is True
    assert parse_launcher_args(module)["config_file"] is None
    as_module = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes=4", "x.py"]
    assert parse_launcher_args(as_module)["cpu"] is True
    assert parse_launcher_args(as_module)["num_processes"] == 4


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/python3", "/venv/bin/accelerate", "launch", "x.py"], True),
        (["accelerate-launch", "x.py"], True),
        (["python", "-m", "accelerate.commands.launch", "x.py"], True),
        (["python", "-m", "torch.distributed.run", "x.py"], False),
        (["bash"], False),
    ],
)
def test_is_accelerate_launch(argv, expected):
    assert _is_accelerate_launch(argv) is expected
