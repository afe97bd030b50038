"""backend=auto follows the launcher; a backend that would train N separate models is refused."""

import pytest

from tests.ports import free_port
from train.launcher import choose_backend, detect_launch

TORCHRUN = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "TORCHELASTIC_RUN_ID": "none"}
DEEPSPEED = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "CROSS_RANK": "0", "CROSS_SIZE": "1"}
ACCELERATE = {**TORCHRUN, "ACCELERATE_MIXED_PRECISION": "no"}
SRUN = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "SLURM_PROCID": "3", "SLURM_NTASKS": "4"}


@pytest.mark.parametrize("env,launcher,world", [
    ({}, "python", 1), (TORCHRUN, "torchrun", 2), (DEEPSPEED, "deepspeed", 2), (ACCELERATE, "accelerate", 2),
    (SRUN, "srun", 4), ({"WORLD_SIZE": "3", "RANK": "0"}, "env", 3),
])
def test_launcher_is_recognised_from_its_environment(env, launcher, world):
    got = detect_launch(env)
    assert (got.launcher, got.world_size) == (launcher, world)


@pytest.mark.parametrize("env,backend", [
    ({}, "single"), (TORCHRUN, "ddp"), (ACCELERATE, "ddp"), (SRUN, "ddp"), (DEEPSPEED, "deepspeed"),
    ({**DEEPSPEED, "WORLD_SIZE": "1"}, "deepspeed"),  # one GPU under deepspeed still means ZeRO
])
def test_auto_backend_follows_the_launcher(env, backend):
    name, why = choose_backend("auto", 3, env)
    assert name == backend and why.startswith("auto:")
    if backend == "deepspeed":
        assert "ZeRO stage 3" in why


@pytest.mark.parametrize("requested", ["ddp", "fsdp", "deepspeed"])
def test_an_explicit_backend_is_kept_under_any_launcher(requested):
    assert choose_backend(requested, 0, TORCHRUN) == (requested, "set in the config")


@pytest.mark.parametrize("env", [TORCHRUN, DEEPSPEED, SRUN])
def test_single_backend_with_several_processes_is_refused(env):
    with pytest.raises(ValueError, match="each would train a model of its own"):
        choose_backend("single", 0, env)
    assert choose_backend("single", 0, {}) == ("single", "set in the config")


def test_config_error_names_the_backend_key(monkeypatch):
    from tests.conftest import compose
    from train.config import ConfigError, validate

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with pytest.raises(ConfigError) as e:
        validate(compose(["backend=single"]))
    assert e.value.key == "backend.name"
    cfg = compose([])
    validate(cfg)
    assert cfg.backend.name == "ddp" and "torchrun started 2 processes" in cfg.backend.chosen_because


def test_deepspeed_stage_0_with_bf16_is_refused_naming_the_key(tmp_path, tokenizer_path):
    import os
    import subprocess

    from tests.conftest import REPO, TINY

    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", free_port(), "launch/pretrain.py",
           *TINY, "backend=deepspeed", "backend.zero_stage=0", "train.precision=bf16",
           f"tokenizer.path={tokenizer_path}", f"run_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0
    assert "config error: backend.zero_stage: DeepSpeed stage 0 with bf16" in p.stdout + p.stderr
