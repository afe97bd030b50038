"""Stopping a run from outside (what a scheduler does before a time limit or a preemption):
SIGUSR1/SIGTERM or the file named by $KILN_STOP_FILE make the trainer checkpoint after the
current step and return, and in a multi-process run every rank stops at the same step even
when only one of them was asked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

from tests.conftest import REPO
from tests.ports import free_port
from train import checkpoint as ckpt
from train.trainer import Trainer


def test_stop_file_checkpoints_after_the_current_step(tiny_cfg, tmp_path, monkeypatch):
    stop = tmp_path / "stop"
    monkeypatch.setenv("KILN_STOP_FILE", str(stop))
    trainer = Trainer(tiny_cfg("train.max_steps=50", "checkpoint.every=100", "train.eval_every=0"))
    step = trainer.backend.step

    def step_then_ask_at_3(*a, **k):
        out = step(*a, **k)
        if trainer.state.step == 2:  # the loop counts this as step 3
            stop.touch()
        return out

    trainer.backend.step = step_then_ask_at_3
    result = trainer.fit()
    assert result["final_step"] == 3 and result["stopped"]
    assert [s for s, _ in ckpt.list_checkpoints(trainer.ckpt_root)] == [3]


def test_signal_handler_requests_a_stop(tiny_cfg):
    trainer = Trainer(tiny_cfg("train.max_steps=50", "checkpoint.every=100", "train.eval_every=0"))
    old = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    try:
        trainer.stop_on_signals()
        step = trainer.backend.step

        def step_then_signal(*a, **k):
            out = step(*a, **k)
            if trainer.state.step == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return out

        trainer.backend.step = step_then_signal
        result = trainer.fit()
    finally:
        signal.signal(signal.SIGUSR1, old[0])
        signal.signal(signal.SIGTERM, old[1])
    assert result["final_step"] == 2 and result["stopped"]
    assert [s for s, _ in ckpt.list_checkpoints(trainer.ckpt_root)] == [2]



def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _rank_of(pid: int):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"]) if b"RANK" in env else None
    except (OSError, ValueError):
        return None


def test_sigusr1_to_one_rank_stops_both_ranks_at_the_same_step(tmp_path, tokenizer_path):
    run_dir = tmp_path / "run"
    args = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
            "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=5", "train.eval_sequences=8",
            "train.log_every=1",
            "train.sample_tokens=0", "logger.plot=false", "train.max_steps=2000", "checkpoint.every=10000",
            "backend=ddp", f"tokenizer.path={tokenizer_path}", f"run_dir={run_dir}"]
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", free_port(),
           "launch/pretrain.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    env.pop("KILN_STOP_FILE", None)
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics, deadline = run_dir / "metrics.jsonl", time.time() + 240
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 2):
            assert p.poll() is None and time.time() < deadline, p.communicate()[0][-4000:]
            time.sleep(0.1)
        rank1 = [c for c in _children(p.pid) if _rank_of(c) == 1]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGUSR1)  # rank 0 is not told
        out, _ = p.communicate(timeout=240)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out[-4000:]
    assert "rank 1: SIGUSR1: checkpointing after this step" in out
    stopped = int(re.search(r"stop requested: checkpointed at step (\d+)", out).group(1))
    assert 3 <= stopped < 2000
    assert [s for s, _ in ckpt.list_checkpoints(str(run_dir / "checkpoints"))] == [stopped]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, stopped + 1))
