"""One kiln process per run directory.

A second launch into a run directory whose run is still alive (a Slurm requeue while the
old job still runs, the same command started twice) would clean up the live run's
temporary checkpoint files and write over its state. ``acquire`` takes an OS file lock
(``flock``, never waiting) on ``<run_dir>/.kiln.lock`` and holds it for the life of the
process: the kernel drops it when the process ends in any way, ``kill -9`` included, so a
lock file left behind by a dead process blocks nothing. The holder (host, pid, start time,
command) is written into the file once the lock is held; a launch that finds the lock held
reads it for its message and leaves the file as it was.

Only the global main rank (rank 0) takes the lock; it tells the other ranks the outcome.
The lock is advisory and lives in the run directory, so it is shared by every node that
sees that directory (flock over NFS is emulated with POSIX locks by Linux clients).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from typing import Optional

from train.errors import ConfigError

LOCK_NAME = ".kiln.lock"


class RunLockError(ConfigError):
    """The run directory's lock cannot be taken: a config error (exit status 2) with the
    key ``run_dir``. ``detail`` is the message without the key, so that the main rank can
    send it to the others, which raise ``RunLockError(detail)`` in turn."""

    def __init__(self, detail: str):
        super().__init__("run_dir", detail)
        self.detail = detail


class RunDirBusy(RunLockError):
    """Another live process holds the run directory's lock; the message names the holder's
    host and pid and the lock file."""


def lock_path(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), LOCK_NAME)


def describe_holder(raw: bytes) -> str:
    """The holder recorded in a lock file, in words."""
    try:
        h = json.loads(raw.decode("utf-8"))
        return (f"host {h['host']}, pid {h['pid']}, started {h.get('started', '?')}, "
                f"{h.get('argv0') or '?'}")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "holder not recorded yet"


class RunLock:
    """The held lock: keep it (the file descriptor) for the life of the process."""

    def __init__(self, path: str, fd: int, created: bool, previous: Optional[tuple[bytes, int, int]]):
        self.path = path
        self.fd: Optional[int] = fd
        self.created = created  # the lock file did not exist before this acquire
        self.previous = previous  # (content, atime_ns, mtime_ns) of the file this acquire rewrote

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Drop the lock now (the kernel also does at exit); the file stays, naming the last holder."""
        if self.fd is None:
            return
        _HELD.pop(self.path, None)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def undo(self) -> None:
        """A start that failed: put the lock file back as it was before this acquire (removed
        if this acquire created it, else its former content and times), then release."""
        if self.fd is None:
            return
        try:
            if self.created:
                os.unlink(self.path)
            elif self.previous is not None:
                content, atime_ns, mtime_ns = self.previous
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, content, 0)
                os.fsync(self.fd)
                os.utime(self.fd, ns=(atime_ns, mtime_ns))
        except OSError:
            pass
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({self.path!r}, held={self.held})"


_HELD: dict[str, RunLock] = {}  # lock file -> this process's lock (keeps the descriptor alive)


def held(run_dir: str) -> Optional[RunLock]:
    """This process's lock on ``run_dir``, if it holds it."""
    return _HELD.get(lock_path(run_dir))


def acquire(run_dir: str) -> RunLock:
    """Take ``run_dir`` (an existing directory)'s lock without waiting and record this
    process as its holder. Raises RunDirBusy (a ConfigError: exit status 2) naming the
    holder's host and pid and the lock file when another live process holds it, leaving
    the lock file untouched; RunLockError when the lock file cannot be opened or written.
    Acquiring again in the process that holds it returns the same lock."""
    path = lock_path(run_dir)
    if path in _HELD:
        return _HELD[path]
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        try:
            fd, created = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            fd, created = os.open(path, flags), False
    except OSError as e:  # a link, no permission, no such directory
        raise RunLockError(f"cannot open the run directory's lock file {path}: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            raw = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        raise RunDirBusy(f"another kiln process ({describe_holder(raw)}) is using run dir "
                         f"{os.path.dirname(path)} (lock file {path}). Two processes in one run directory "
                         "would delete each other's checkpoints in progress: wait for it to end or stop it, "
                         "or give this run another directory (run_name=... or run_dir=...).") from None
    try:
        st = os.fstat(fd)
        previous = None if created else (os.pread(fd, max(st.st_size, 0), 0), st.st_atime_ns, st.st_mtime_ns)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv0": sys.argv[0] if sys.argv else ""}
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError as e:
        os.close(fd)
        raise RunLockError(f"cannot record this process in the run directory's lock file {path}: {e}") from None
    except BaseException:
        os.close(fd)
        raise
    lock = _HELD[path] = RunLock(path, fd, created, previous)
    return lock


def _close_in_child() -> None:
    """A forked child must not keep the parent's lock alive after the parent dies: it closes
    its copies of the descriptors (the parent keeps the lock: flock is released only when
    every copy is closed)."""
    for lock in list(_HELD.values()):
        if lock.fd is not None:
            try:
                os.close(lock.fd)
            except OSError:
                pass
            lock.fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)
