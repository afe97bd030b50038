"""Tensor parallelism for real: ``backend=fsdp backend.tp=2`` in 2 processes over gloo on CPU
(train/parallel/), against one process.

One launch set, shared by every test here:

- the reference: one process, 10 steps, checkpoints at 5 and 10;
- tp=2 (data-parallel 1 x tensor-parallel 2), stopped at step 5, the loss computed in
  chunks (``model.loss_chunk=48``), activation checkpointing and evaluation on, gradients
  clipped (``optim.grad_clip`` 1.0: the norm is about 1, so some steps clip);
- the tp=2 checkpoint resumed in one process (DCP resharded to a plain model), and the
  reference's step-5 checkpoint (portable full state) resumed at tp=2;
- 4 processes at data-parallel 2 x tensor-parallel 2 (micro-batch 2 per data rank: the same
  global batch), stopped at step 5 and resumed in one process.

Both tensor-parallel ranks must read the same micro-batch and the loop must count it once:
otherwise the losses move by far more than the tolerances (test_distributed.py says why
1e-4; the step-0 validation differs only by summation order, 1e-5).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, compose
from tests.test_distributed import COMMON, VAL_TOL, assert_close, launch, losses

TP2 = ["backend=fsdp", "backend.tp=2", "model.loss_chunk=48"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("tp")
    common = COMMON + [f"tokenizer.path={tokenizer_path}", "train.micro_batch_size=4"]
    ref = root / "reference"
    launch("python", common + [f"run_dir={ref}"])
    tp2 = root / "tp2"
    # Activation checkpointing recomputes each split block in backward: numerics unchanged.
    header = launch("torchrun", common + TP2 + [f"run_dir={tp2}", "train.stop_at_step=5",
                                                 "train.activation_checkpointing=true"])
    tp2_losses, tp2_val = losses(tp2), losses(tp2, "eval")
    # tp=2 -> one process: the same run directory, resumed by a plain launch.
    launch("python", common + [f"run_dir={tp2}"])
    # one process -> tp=2: the reference's step-5 checkpoint, resumed in a new run directory.
    single_to_tp2 = root / "single-to-tp2"
    launch("torchrun", common + TP2 + [f"run_dir={single_to_tp2}",
                                        f"resume={ref / 'checkpoints' / 'step_00000005'}"])
    # dp2 x tp2: 4 processes, each data rank reading its own micro-batch of 2.
    dp2tp2 = root / "dp2-tp2"
    header4 = launch("torchrun", common + TP2 + [f"run_dir={dp2tp2}", "train.stop_at_step=5",
                                                  "train.micro_batch_size=2"], nproc=4)
    dp2tp2_losses, dp2tp2_val = losses(dp2tp2), losses(dp2tp2, "eval")
    launch("python", common + [f"run_dir={dp2tp2}"])  # its DCP checkpoint resumed in one process
    return {"ref": losses(ref), "ref_val": losses(ref, "eval"), "tp2": tp2_losses, "tp2_val": tp2_val,
            "tp2_to_single": losses(tp2), "single_to_tp2": losses(single_to_tp2), "header": header,
            "dp2tp2": dp2tp2_losses, "dp2tp2_val": dp2tp2_val, "dp2tp2_to_single": losses(dp2tp2),
            "header4": header4}


def test_tp2_step0_validation_equals_one_process(runs):
    assert abs(runs["tp2_val"][0] - runs["ref_val"][0]) <= VAL_TOL, (runs["tp2_val"], runs["ref_val"])


def test_tp2_first_five_training_losses_and_validations_match_one_process(runs):
    assert_close(runs["tp2"], runs["ref"], range(1, 6))
    assert_close(runs["tp2_val"], runs["ref_val"], [2, 4])
    assert "data-parallel 1 =" in runs["header"]  # the global batch counts the tp group once


def test_tp2_checkpoint_resumes_in_one_process(runs):
    assert_close(runs["tp2_to_single"], runs["ref"], range(6, 11))


def test_one_process_checkpoint_resumes_at_tp2(runs):
    assert_close(runs["single_to_tp2"], runs["ref"], range(6, 11))


def test_dp2_tp2_on_four_processes_matches_one_process_and_resumes_in_one(runs):
    assert "data-parallel 2 =" in runs["header4"]  # two data ranks, each a tp pair reading one micro-batch
    assert abs(runs["dp2tp2_val"][0] - runs["ref_val"][0]) <= VAL_TOL, (runs["dp2tp2_val"], runs["ref_val"])
    assert sorted(runs["dp2tp2"]) == [1, 2, 3, 4, 5]
    assert_close(runs["dp2tp2"], runs["ref"], range(1, 6))
    assert_close(runs["dp2tp2_to_single"], runs["ref"], range(6, 11))


def test_tp2_sharded_init_holds_the_one_process_weights(tmp_path, tokenizer_path):
    """Built on the meta device, split over tp and each part filled by its rank: the ranks'
    parts gathered equal a one-process build with the same seed, exactly."""
    from tests.test_sharded_init import probe

    got = probe("torchrun", ["backend=fsdp", "backend.tp=2", f"run_dir={tmp_path / 'run'}",
                             f"tokenizer.path={tokenizer_path}"], tmp_path / "probe.json")
    assert got["built"]["meta"]
    assert max(got["max_abs_diff"].values()) == 0.0, got["max_abs_diff"]


@pytest.mark.parametrize("overrides,world,names", [
    (["backend.tp=2", "model.n_heads=4", "model.n_kv_heads=1"], "2", "model.n_kv_heads=1"),
    (["backend.tp=4", "model.n_heads=6", "model.d_model=48", "model.n_kv_heads=6"], "4", "model.n_heads=6"),
    (["backend.tp=4"], "2", "world size 2"),
])
def test_tp_that_does_not_split_heads_or_ranks_is_a_config_error_naming_backend_tp(monkeypatch, overrides, world,
                                                                                   names):
    from train.config import ConfigError, validate

    monkeypatch.setenv("WORLD_SIZE", world)
    cfg = compose(["backend=fsdp", "model.n_heads=8", "model.n_kv_heads=4", *overrides])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.key == "backend.tp" and names in str(e.value), str(e.value)


def test_tp_under_another_backend_is_a_config_error(monkeypatch):
    from train.config import ConfigError, validate

    cfg = compose(["backend=ddp", "backend.tp=2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="backend.tp: tensor parallelism runs under backend=fsdp"):
        validate(cfg)


def test_a_launch_with_a_bad_tp_exits_2_naming_the_key(tmp_path, tokenizer_path):
    cmd = [sys.executable, "launch/pretrain.py", *COMMON, "backend=fsdp", "backend.tp=2", "model.n_kv_heads=1",
           f"tokenizer.path={tokenizer_path}", f"run_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert "config error: backend.tp: 2 does not divide model.n_kv_heads=1" in p.stderr
    assert not (tmp_path / "run").exists()


def test_tp_for_fine_tuning_is_a_config_error():
    from train.config import ConfigError
    from train.parallel.mesh import layout
    from train.sft.config import register_sft_configs

    register_sft_configs()
    cfg = compose(["backend=fsdp", "backend.tp=2"], config_name="sft")
    with pytest.raises(ConfigError, match="backend.tp: fine-tuning"):
        layout(cfg, 2)
    assert layout(compose(["backend=fsdp", "backend.tp=2"]), 4).dp == 2  # pretraining: 2 data x 2 tensor ranks


def test_context_parallelism_is_a_config_error_saying_why(monkeypatch):
    from train.config import ConfigError, validate

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="backend.cp: context parallelism is not implemented .*does not run on a CPU"):
        validate(compose(["backend=fsdp", "backend.cp=2"]))
