"""data.num_workers > 0 with train.data_sharding=shards: background processes read, filter,
tokenize and pack the rank's virtual shards. The trainer receives the very windows the
in-process stream gives, and the checkpointed data position is that of the windows the
trainer consumed (not of what the workers prefetched), equal to the in-process state, so
runs with and without workers resume each other exactly."""

from __future__ import annotations

import json

from tests.test_checkpoint import run
from train.data import build_train_stream


def streams(tiny_cfg, tokenizer, workers: int, world: int = 2):
    cfg = tiny_cfg("train.virtual_shards=4", f"data.num_workers={workers}", "data.prefetch=4")
    cfg.train.micro_batch_size = 2
    return build_train_stream(cfg, tokenizer, 0, world)


def as_stored(state: dict) -> dict:
    return json.loads(json.dumps(state))  # what trainer_state.json keeps


def test_workers_deliver_the_in_process_windows_and_position(tiny_cfg, tokenizer):
    inline, background = streams(tiny_cfg, tokenizer, 0), streams(tiny_cfg, tokenizer, 2)
    try:
        for _ in range(25):  # the workers run ahead by up to 4 windows each meanwhile
            assert next(inline)["input"].equal(next(background)["input"])
        assert as_stored(background.state_dict()) == as_stored(inline.state_dict())
        assert len(background.windows.workers.procs) == 2
    finally:
        background.close()
    assert background.windows.workers.procs == []


def test_positions_move_between_runs_with_and_without_workers(tiny_cfg, tokenizer):
    inline = streams(tiny_cfg, tokenizer, 0)
    for _ in range(7):  # 7 steps x 4 rows: the next row is in the middle of the 4 shards' cycle
        next(inline)
    resumed = streams(tiny_cfg, tokenizer, 2)
    resumed.load_state_dict(as_stored(inline.state_dict()))
    try:
        for _ in range(10):
            assert next(inline)["input"].equal(next(resumed)["input"])
        back = streams(tiny_cfg, tokenizer, 0)
        back.load_state_dict(as_stored(resumed.state_dict()))
        for _ in range(5):
            assert next(inline)["input"].equal(next(back)["input"])
    finally:
        resumed.close()


def test_a_run_with_workers_resumes_to_the_losses_of_the_uninterrupted_run(tiny_cfg, tmp_path):
    common = ["train.max_steps=12", "checkpoint.every=100", "train.eval_every=4", "train.virtual_shards=4"]
    _, straight = run(tiny_cfg(*common, f"run_dir={tmp_path / 'a'}"))
    workers = [*common, "data.num_workers=2", f"run_dir={tmp_path / 'b'}"]
    _, first = run(tiny_cfg(*workers), stop_at=5)
    trainer, second = run(tiny_cfg(*workers))
    assert second["start_step"] == 5
    assert {**first["losses"], **second["losses"]} == straight["losses"]
    assert second["val_losses"][12] == straight["val_losses"][12]
    assert trainer.train_batches.windows.workers.procs == []  # stopped when fit returned


def test_workers_exit_when_the_trainer_is_killed(tiny_cfg, tokenizer, tmp_path):
    """A SIGKILLed trainer (OOM killer, scheduler) must not leave workers holding memory."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    script = tmp_path / "trainer.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {REPO!r})
from tests.conftest import compose, TINY
from data_pipeline.tokenizer import Tokenizer
from train.data import build_train_stream
if __name__ == "__main__":
    cfg = compose(TINY + ["train.virtual_shards=4", "data.num_workers=2", "data.prefetch=2",
                          "tokenizer.path={tokenizer.path}", "run_dir={tmp_path / 'run'}"])
    s = build_train_stream(cfg, Tokenizer("{tokenizer.path}"), 0, 1)
    next(s)
    print(" ".join(str(p.pid) for p in s.windows.workers.procs), flush=True)
    time.sleep(600)
""")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    assert len(pids) == 2
    p.send_signal(signal.SIGKILL)
    p.wait()
    deadline = time.time() + 60
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in alive if os.path.exists(f"/proc/{pid}") and
                 open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
    assert not alive, f"workers {alive} outlived the killed trainer"
