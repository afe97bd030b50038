"""A rank's background write of its checkpoint files, and the one thread that runs such
writes: what a backend's ``save`` returns and the checkpoint manager waits on. Owned here,
beside the manager, so the backends depend on the checkpoint package and never the reverse."""

from __future__ import annotations


class Writing:
    """A rank's write of its checkpoint files, finished or still running in a background
    thread (``future``); ``wait`` re-raises the writer's error."""

    def __init__(self, future=None):
        self.future = future
        self.blocked_s = 0.0  # training time spent waiting on this write outside the manager (FSDP staging)

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def wait(self) -> None:
        if self.future is not None:
            self.future.result()


_writer = None


def background_writer():
    """The one thread that writes checkpoint files in the background (one save at a time)."""
    global _writer
    if _writer is None:
        from concurrent.futures import ThreadPoolExecutor

        _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-ckpt")
    return _writer
