"""The DeepSpeed config kiln generates and the user files it accepts, checked on the values
(``build_ds_config``, config validation) and read back through DeepSpeed's own config
parsers; no process is launched (tests/test_backend_optimizers.py checks the engines)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import compose
from train.backends.deepspeed import build_ds_config
from train.config import ConfigError, validate, validate_or_exit

ZERO2 = ["backend=deepspeed", "backend.zero_stage=2", "train.micro_batch_size=4", "train.grad_accum_steps=2"]


def with_user_file(tmp_path, user: dict, *overrides: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    return compose([*ZERO2, f"backend.ds_config={path}", *overrides])


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_reduces_and_accumulates_gradients_in_fp32_as_fsdp_does(stage, bf16):
    from deepspeed.runtime.config import DtypeEnum, get_communication_data_type

    ds = build_ds_config(compose(["backend=deepspeed", f"backend.zero_stage={stage}"]), bf16=bf16)
    assert get_communication_data_type(ds) == torch.float32
    assert DtypeEnum(ds["data_types"]["grad_accum_dtype"]).value == torch.float32


@pytest.mark.parametrize("stage", [2, 3])
def test_zero2_and_zero3_reduce_gradient_buckets_while_backward_runs(stage):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = build_ds_config(compose(["backend=deepspeed", f"backend.zero_stage={stage}"]), bf16=True)
    assert DeepSpeedZeroConfig(**ds["zero_optimization"]).overlap_comm is True


@pytest.mark.parametrize("user,ds_key,kiln_key", [
    ({"gradient_clipping": 5.0}, "gradient_clipping", "optim.grad_clip"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "backend.zero_stage"),
    ({"train_batch_size": 8}, "train_batch_size", "train.micro_batch_size x train.grad_accum_steps x 2 ranks"),
    ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps", "train.grad_accum_steps"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "train.precision"),
    ({"fp16": {"enabled": True}}, "fp16.enabled", "train.precision"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer.device",
     "backend.offload_optimizer"),
])
def test_a_user_file_value_that_disagrees_with_kiln_is_a_config_error_naming_both_keys(tmp_path, monkeypatch, user,
                                                                                        ds_key, kiln_key):
    monkeypatch.setenv("WORLD_SIZE", "2")  # kiln's global batch: 4 x 2 x 2 ranks = 16
    cfg = with_user_file(tmp_path, user)
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg, bf16=False)
    assert e.value.key == "backend.ds_config"
    assert f"{ds_key}=" in str(e.value) and f"kiln's {kiln_key}," in str(e.value), str(e.value)


def test_a_user_file_may_repeat_kilns_values_say_auto_and_set_deepspeed_only_knobs(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    user = {"gradient_clipping": 1, "train_batch_size": 16, "train_micro_batch_size_per_gpu": "auto",
            "bf16": {"enabled": "auto"}, "communication_data_type": "bf16",
            "zero_optimization": {"stage": 2, "reduce_bucket_size": 123, "overlap_comm": False,
                                  "offload_optimizer": {"device": "none"}}}
    ds = build_ds_config(with_user_file(tmp_path, user), bf16=True)
    assert ds["gradient_clipping"] == 1 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["bf16"] == {"enabled": True}  # "auto": kiln's value
    assert "train_batch_size" not in ds  # agreed; DeepSpeed derives it from micro-batch and accumulation
    # Knobs kiln has no key for are the user's to set, its own defaults included.
    assert ds["communication_data_type"] == "bf16"
    assert ds["zero_optimization"]["reduce_bucket_size"] == 123 and ds["zero_optimization"]["overlap_comm"] is False


def test_an_unreadable_user_file_is_a_config_error(tmp_path):
    (tmp_path / "ds.json").write_text("{not json")
    cfg = compose([*ZERO2, f"backend.ds_config={tmp_path / 'ds.json'}"])
    with pytest.raises(ConfigError, match="backend.ds_config: cannot read"):
        build_ds_config(cfg, bf16=False)


def test_validation_refuses_a_disagreeing_user_file_before_the_trainer_starts(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")  # as a launcher sets it
    cfg = with_user_file(tmp_path, {"zero_optimization": {"stage": 3}})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "backend.ds_config" and "backend.zero_stage" in str(e.value)
    cfg.backend.ds_config = None
    validate(cfg)  # the same run without the file is valid: the refusal is the file's


def test_deepspeed_without_a_launcher_ends_with_a_config_error_and_exit_status_2(monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as e:
        validate_or_exit(compose(["backend=deepspeed"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config error: backend.name: backend=deepspeed" in err and "deepspeed --num_gpus" in err
