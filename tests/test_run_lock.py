"""One kiln process per run directory (train/run_lock.py), shown with real processes.

Faults defended against: a second launch into a live run directory (a Slurm requeue while
the old job still runs) deleting the live run's checkpoint in progress; a lock left behind
by a process killed with -9 blocking every later launch; a refused acquire rewriting the
lock file (and so the holder it names); a forked child keeping the lock of a dead parent.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.ckpt_helpers import RUN, pretrain
from tests.conftest import REPO
from train import run_lock
from train.config import ConfigError

HOLD = """
import os, sys, time
sys.path.insert(0, {repo!r})
from train import run_lock
run_lock.acquire({run_dir!r})
if {fork}:
    r, w = os.pipe()
    if os.fork() == 0:  # a child that outlives its parent (its copy of the lock closed at fork)
        os.write(w, b"x")
        time.sleep(600)
        os._exit(0)
    os.read(r, 1)
sys.stdout.write(f"held {{os.getpid()}}\\n")
sys.stdout.flush()
time.sleep(600)
"""


def hold(run_dir, fork: bool = False) -> subprocess.Popen:
    """A process that takes ``run_dir``'s lock and sleeps, holding it (with ``fork``, after
    forking a child that sleeps too)."""
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=REPO, run_dir=str(run_dir), fork=fork)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    line = p.stdout.readline()
    if not line.startswith("held"):
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError(line + p.stderr.read())
    return p


def kill9(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def file_state(path):
    st = os.stat(path)
    with open(path, "rb") as f:
        return f.read(), st.st_mtime_ns, st.st_size


def test_a_second_acquire_is_refused_naming_the_holder_and_leaves_the_lock_file_as_it_was(tmp_path):
    holder = hold(tmp_path)
    try:
        lock_file = tmp_path / run_lock.LOCK_NAME
        before = file_state(lock_file)
        assert f'"pid": {holder.pid}' in before[0].decode()
        with pytest.raises(run_lock.RunDirBusy) as e:
            run_lock.acquire(str(tmp_path))
        msg = str(e.value)
        assert isinstance(e.value, ConfigError) and e.value.key == "run_dir"
        assert f"pid {holder.pid}" in msg and f"host {socket.gethostname()}" in msg and str(lock_file) in msg
        assert "another kiln process" in msg and str(tmp_path) in msg
        assert file_state(lock_file) == before
    finally:
        kill9(holder)


def test_a_lock_left_by_a_process_killed_with_9_does_not_block_a_new_acquire(tmp_path):
    holder = hold(tmp_path)
    kill9(holder)
    lock_file = tmp_path / run_lock.LOCK_NAME
    assert f'"pid": {holder.pid}' in lock_file.read_text()  # the stale file stays ...
    lock = run_lock.acquire(str(tmp_path))  # ... and blocks nothing
    try:
        assert f'"pid": {os.getpid()}' in lock_file.read_text()
        assert run_lock.acquire(str(tmp_path)) is lock  # the holder asking again gets its own lock
    finally:
        lock.release()
    assert run_lock.held(str(tmp_path)) is None


def test_a_forked_child_does_not_keep_the_lock_of_a_parent_killed_with_9(tmp_path):
    holder = hold(tmp_path, fork=True)
    try:
        kill9(holder)
        lock = run_lock.acquire(str(tmp_path))  # the child still sleeps, its copy of the descriptor closed
        lock.release()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_undoing_an_acquire_of_a_failed_start_puts_the_lock_file_back(tmp_path):
    lock = run_lock.acquire(str(tmp_path))
    lock.undo()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()  # this acquire created it
    (tmp_path / run_lock.LOCK_NAME).write_text("an earlier holder\n")
    os.utime(tmp_path / run_lock.LOCK_NAME, ns=(1_000_000_000, 2_000_000_000))
    before = file_state(tmp_path / run_lock.LOCK_NAME)
    lock = run_lock.acquire(str(tmp_path))
    assert file_state(tmp_path / run_lock.LOCK_NAME) != before
    lock.undo()
    assert file_state(tmp_path / run_lock.LOCK_NAME) == before and run_lock.held(str(tmp_path)) is None


def test_a_launch_into_a_live_run_dir_exits_2_naming_the_holder_and_deletes_nothing(tmp_path, tokenizer_path):
    """A requeued job started while the old one still runs: the old run's save in progress survives."""
    run_dir = tmp_path / "live"
    in_progress = run_dir / "checkpoints" / ".tmp-step_00000006"
    in_progress.mkdir(parents=True)
    (in_progress / "model.safetensors").write_bytes(b"being written by the live run")
    holder = hold(run_dir)
    try:
        lock_file = run_dir / run_lock.LOCK_NAME
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        t0 = time.time()
        p = pretrain(*RUN, f"tokenizer.path={tokenizer_path}", f"run_dir={run_dir}", "train.max_steps=1",
                     "train.eval_every=0", ok=False)
        out = p.stdout[-2000:] + p.stderr[-2000:]
        assert p.returncode == 2, out
        assert "another kiln process" in p.stderr and f"pid {holder.pid}" in p.stderr, out
        assert f"host {socket.gethostname()}" in p.stderr and str(lock_file) in p.stderr, out
        assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
        assert holder.poll() is None and time.time() - t0 < 300
    finally:
        kill9(holder)
