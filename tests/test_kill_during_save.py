"""kill -9 while a checkpoint is being written: the last complete checkpoint is used, the
half-written one is cleaned up, and the resumed run's losses equal the uninterrupted run's
bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

ARGS = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=10", "train.eval_sequences=4",
        "train.log_every=1", "train.sample_tokens=0", "logger.plot=false", "train.max_steps=40", "checkpoint.every=1",
        "checkpoint.keep_last=2", "optim.warmup_steps=2"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")


def logged_losses(run_dir) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            if r["kind"] == "train":
                out.setdefault(r["step"], []).append(r["loss"])
    return out


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_kill_9_during_a_save_resumes_bit_exact(tmp_path, tokenizer_path, async_save):
    common = ARGS + [f"tokenizer.path={tokenizer_path}", f"checkpoint.async_save={async_save}"]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "launch/pretrain.py", *common, f"run_dir={straight}"], cwd=REPO, env=ENV,
                   check=True, capture_output=True, timeout=600)

    run_dir = tmp_path / "killed"
    root = run_dir / "checkpoints"
    p = subprocess.Popen([sys.executable, "launch/pretrain.py", *common, f"run_dir={run_dir}"], cwd=REPO, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    caught = None
    deadline = time.time() + 300
    try:
        while p.poll() is None and time.time() < deadline:
            tmp = [n for n in os.listdir(root) if n.startswith(".tmp-step_")] if root.is_dir() else []
            mid_save = tmp and (root / tmp[0] / "model.safetensors").exists()  # weights on disk, not sealed
            if mid_save and int(tmp[0].removeprefix(".tmp-step_")) >= 3:  # with good checkpoints before it
                p.send_signal(signal.SIGKILL)
                caught = tmp[0]
                break
            time.sleep(0.0005)
    finally:
        p.kill()
        p.wait()
    assert caught, "no save was caught in progress"
    killed_at = int(caught.removeprefix(".tmp-step_"))
    assert killed_at < 40

    out = subprocess.run([sys.executable, "launch/pretrain.py", *common, f"run_dir={run_dir}"], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"resumed from {root}/step_{killed_at - 1:08d}" in out.stdout
    assert "left by an interrupted save" in out.stdout
    assert not any(n.startswith(".tmp-") for n in os.listdir(root))
    want = {s: v[0] for s, v in logged_losses(straight).items()}
    got = logged_losses(run_dir)
    assert sorted(got) == list(range(1, 41))
    for s, values in got.items():  # steps logged before the kill and again after the resume: all equal
        assert all(v == want[s] for v in values), (s, values, want[s])
