"""Fine-tuning from sharded checkpoints and across processes, with the real launchers.

Two tiny pretraining runs are made the way users make them: FSDP over 2 processes (torchrun,
a DCP checkpoint) and DeepSpeed ZeRO-3 over 2 processes (a ZeRO-partitioned checkpoint).
- SFT starts from the ZeRO-3 checkpoint with exactly its weights;
- a 2-process (torchrun) DeepSpeed ZeRO-3 LoRA fine-tune from the FSDP checkpoint gives the same
  losses as 1 process with the same global batch (the token count is all-reduced before
  the step), and its adapter checkpoint holds full, trained tensors (gathered, not the
  empty ZeRO-3 partitions).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.conftest import REPO
from tests.ports import free_port
from tests.sft_helpers import SFT_TINY, chat_file, sft_cfg

PRETRAIN = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=1", "train.eval_sequences=4",
            "train.sample_tokens=0",
            "logger.plot=false", "train.max_steps=2", "checkpoint.every=2", "optim.warmup_steps=1"]
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]


def launch(launcher: str, script: str, args: list[str], timeout: int = 600) -> str:
    port = free_port()
    if launcher == "torchrun":
        cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", port, script, *args]
    else:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", port, script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def train_losses(run_dir, kind: str = "train") -> dict[int, float]:
    key = "loss" if kind == "train" else "val_loss"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if r["kind"] == kind}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("sft_dist")
    common = PRETRAIN + [f"tokenizer.path={tokenizer_path}"]
    launch("torchrun", "launch/pretrain.py", common + ["backend=fsdp", f"run_dir={root / 'fsdp'}"])
    launch("deepspeed", "launch/pretrain.py", common + ["backend=deepspeed", "backend.zero_stage=3",
                                                        f"run_dir={root / 'zero3'}"])
    return root


def test_sft_starts_from_a_zero3_checkpoint_with_its_weights(sharded, tmp_path):
    from train.checkpoint import resolve
    from train.checkpoint.full_state import read_full_state, storage_format
    from train.sft.trainer import SFTTrainer

    step = resolve(str(sharded / "zero3"))
    assert storage_format(step) == "deepspeed"
    tr = SFTTrainer(sft_cfg(tmp_path / "run", str(sharded / "zero3"), [chat_file(tmp_path, 8)], "train.max_steps=1"))
    model = tr.backend.raw_model
    want = read_full_state(step, model, with_optimizer=False).model
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), want[n].to(p.dtype)), n
    assert (tr.tokenizer.path, tr.model_cfg.d_model) == (os.path.join(step, "tokenizer.model"), 64)
    res = tr.fit()
    assert res["final_step"] == 1 and res["losses"][1] > 0


def test_two_process_zero3_lora_from_fsdp_checkpoint_matches_one_process(sharded, tmp_path):
    from safetensors.torch import load_file

    from train.checkpoint.full_state import storage_format
    from train.sft.trainer import SFTTrainer

    fsdp = str(sharded / "fsdp")
    assert storage_format(os.path.join(fsdp, "checkpoints", "step_00000002")) == "dcp"
    data = chat_file(tmp_path, 32)
    val = chat_file(tmp_path, 10, seed=1)  # 5 rows: rank 1 of 2 runs a padding batch under ZeRO-3
    steps = ["train.max_steps=3", "checkpoint.every=3", "train.grad_accum_steps=2", f"sft.val_paths=[{val}]",
             "train.eval_every=1", "train.eval_sequences=5"]
    one = SFTTrainer(sft_cfg(tmp_path / "one", fsdp, [data], *LORA, *steps, "train.micro_batch_size=4")).fit()
    args = [a for a in SFT_TINY if not a.startswith("train.micro_batch_size")]
    launch("torchrun", "launch/sft.py", args + LORA + steps + [
        f"init_from={fsdp}", f"sft.paths=[{data}]", f"run_dir={tmp_path / 'two'}", "train.micro_batch_size=2",
        "backend=deepspeed", "backend.zero_stage=3"])
    two = train_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3]
    for s in (1, 2, 3):
        assert abs(two[s] - one["losses"][s]) < 1e-4, (two, one["losses"])
    two_val = train_losses(tmp_path / "two", "eval")
    assert sorted(two_val) == sorted(one["val_losses"]) == [0, 1, 2, 3]
    assert abs(two_val[0] - one["val_losses"][0]) < 1e-5
    assert all(abs(two_val[s] - one["val_losses"][s]) < 1e-4 for s in (1, 2, 3)), (two_val, one["val_losses"])
    assert one["losses"][3] != one["losses"][1]
    got = load_file(tmp_path / "two" / "checkpoints" / "step_00000003" / "adapter.safetensors")
    want = load_file(tmp_path / "one" / "checkpoints" / "step_00000003" / "adapter.safetensors")
    assert got.keys() == want.keys() and len(got) == 28
    for k in got:
        assert got[k].shape == want[k].shape and got[k].numel() > 0, k
        torch.testing.assert_close(got[k], want[k], atol=1e-4, rtol=1e-3)
    assert any(got[k].abs().sum() > 0 for k in got if "lora_B" in k)

