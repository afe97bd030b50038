"""Multi-worker streaming into the trainer, with exact resume.

Each (rank, DataLoader worker) pair is one shard of the input: shard
``rank * num_workers + worker``, of ``world * num_workers``; readers split files (or
records) by shard, so no document is read twice or lost. Workers produce whole
micro-batches and send each with the state of their stream *after* it; the main process
records a worker's state only when the trainer takes that batch, so the saved state is
exactly what was consumed, not what was prefetched.

DataLoader hands out batches round-robin starting from worker 0. To resume in the middle
of a round, the logical roles rotate: after a restart, worker ``w`` plays logical worker
``(w + next_worker) % num_workers``, so the trainer sees the same sequence of batches as
without the restart. (torchdata's StatefulDataLoader is not on the default install; this
small wrapper is all kiln needs.)
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class _ShardedStreams(IterableDataset):
    def __init__(self, make_stream: Callable[[int, int], object], rank: int, world: int, num_workers: int,
                 offset: int, states: list, start_epoch: int = 0):
        self.make_stream, self.rank, self.world = make_stream, rank, world
        self.num_workers, self.offset, self.states = num_workers, offset, states
        self.start_epoch = start_epoch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.offset) % self.num_workers
        stream = self.make_stream(self.rank * self.num_workers + logical, self.world * self.num_workers)
        if self.states[logical] is not None:
            stream.load_state_dict(self.states[logical])
        elif self.start_epoch:
            stream.set_epoch(self.start_epoch)
        for item in stream:
            yield logical, item, stream.state_dict()


class StreamingLoader:
    """Iterator of batches from ``num_workers`` worker processes; ``state_dict`` is the
    per-worker stream states plus whose turn is next."""

    def __init__(self, make_stream: Callable[[int, int], object], num_workers: int, rank: int = 0,
                 world: int = 1, prefetch_factor: int = 2):
        if num_workers < 1:
            raise ValueError("StreamingLoader needs num_workers >= 1 (use the stream itself for 0)")
        self.make_stream, self.num_workers, self.rank, self.world = make_stream, num_workers, rank, world
        self.prefetch_factor = prefetch_factor
        self.states: list = [None] * num_workers
        self.next_worker = 0
        self.start_epoch = 0
        self._it = None

    def _start(self):
        ds = _ShardedStreams(self.make_stream, self.rank, self.world, self.num_workers, self.next_worker,
                             list(self.states), self.start_epoch)
        dl = DataLoader(ds, batch_size=None, num_workers=self.num_workers, prefetch_factor=self.prefetch_factor)
        self._it = iter(dl)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start()
        logical, item, state = next(self._it)
        self.states[logical] = state
        self.next_worker = (logical + 1) % self.num_workers
        return item

    def state_dict(self) -> dict:
        epochs = [s["docs"]["epoch"] for s in self.states if s is not None and "docs" in s]
        return {"workers": list(self.states), "next_worker": self.next_worker, "num_workers": self.num_workers,
                "rank": self.rank, "world": self.world,
                # same key as a single-process stream's state, read by the trainer on a world-size change
                "docs": {"epoch": max(epochs, default=self.start_epoch)}}

    def set_epoch(self, epoch: int) -> None:
        """Workers without a saved state start at ``epoch`` (resume with another world size)."""
        self.start_epoch = epoch
        self._it = None

    def load_state_dict(self, state: dict) -> None:
        if (state["num_workers"], state["rank"], state["world"]) != (self.num_workers, self.rank, self.world):
            raise ValueError(f"loader state was saved with {state['num_workers']} workers on rank "
                             f"{state['rank']}/{state['world']}; this loader has {self.num_workers} on "
                             f"{self.rank}/{self.world}")
        self.states = list(state["workers"])
        self.next_worker = state["next_worker"]
        self._it = None  # workers restart with the loaded states
