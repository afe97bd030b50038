"""Background processes for the ``shards`` data stream (``data.num_workers`` > 0).

Reading, extraction, filters, dedup, tokenizing and packing of a rank's virtual shards run
in ``data.num_workers`` spawned processes, each owning some of the shards and sending
their windows through a bounded queue (``data.prefetch`` windows per worker), so the
training thread only collates.

What a checkpoint stores must be the position of what the trainer consumed, not of what
the workers prefetched. Every window travels with the light part of its shard's state
after it (reader offset, epoch, pack buffer, mixture counters): cheap to send. The heavy
part, each dedup index, is not sent: the worker records every change to it (an inserted
hash, a MinHash entry, an epoch reset) and ships the changes with the window that caused
them; the training process keeps a mirror of each shard's pipeline and replays the changes
of consumed windows only. The checkpointed state is then the light state of the last
consumed window with the mirrors' indexes put in, the very state the in-process stream
would have at that point, so either kind of run resumes the other exactly.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue

import torch

from data_pipeline.pipeline import pipeline_parts, source_streams
from data_pipeline.stream import PackedStream


def _stateful_steps(packed: PackedStream) -> list:
    """The stateful steps of a shard's stream, in a fixed order (sources, then chain)."""
    return [part for part in pipeline_parts(packed.docs) if getattr(part, "stateful", False)]


def _strip_files(state):
    """Reader states carry the whole list of input files; it does not travel per window."""
    if isinstance(state, dict):
        return {k: _strip_files(v) for k, v in state.items() if not (k == "files" and "file_idx" in state)}
    if isinstance(state, list):
        return [_strip_files(v) for v in state]
    return state


def _fill_in(state, mirrors: list, files: list):
    """The inverse of the worker's light state: mirrored indexes and file lists put back."""
    files = list(files)

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"mirrored"}:
                return mirrors[node["mirrored"]].state_dict()
            out = {k: walk(v) for k, v in node.items()}
            if "file_idx" in node and "files" not in node:
                out["files"] = files.pop(0)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(state)


def _leave(out: mp.Queue) -> None:
    """Exit without flushing the queue: its feeder thread would block forever on a pipe
    that nobody reads any more."""
    out.cancel_join_thread()
    os._exit(0)


def _worker(make_shard, shard_ids: list[int], states: dict, out: mp.Queue, prefetch_parent: int) -> None:
    torch.set_num_threads(1)
    streams = {}  # shard -> (packed stream, its stateful steps, all its reader and steps)
    for v in shard_ids:
        packed = make_shard(v)
        if states.get(v) is not None:
            packed.load_state_dict(states[v])
        stateful = _stateful_steps(packed)
        for i, step in enumerate(stateful):
            step.journal, step.mirror_id = [], i
        streams[v] = (packed, stateful, pipeline_parts(packed.docs))
    while True:
        for v in shard_ids:
            if os.getppid() != prefetch_parent:  # the trainer is gone (killed): so is this worker
                _leave(out)
            packed, stateful, parts = streams[v]
            window = next(packed)
            changes = [step.journal[:] for step in stateful]
            for step in stateful:
                step.journal.clear()
            stats = [part.stats.as_dict() for part in parts]
            # numpy, not tensors: torch would move each tensor through a shared-memory segment
            window = {k: t.numpy() for k, t in window.items()}
            item = (v, window, _strip_files(packed.state_dict()), changes, stats)
            while True:
                try:
                    out.put(item, timeout=5)
                    break
                except queue.Full:
                    if os.getppid() != prefetch_parent:
                        _leave(out)


class WorkerShard:
    """One virtual shard as the trainer sees it: windows from a worker, state from the
    mirror plus the light state of the last consumed window."""

    def __init__(self, v: int, mirror: PackedStream, pool: ShardWorkers):
        self.v, self.mirror, self.pool = v, mirror, pool
        self.light = None  # state of the last consumed window, without indexes and file lists

    @property
    def docs(self):
        return self.mirror.docs

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        v, window, light, changes, stats = self.pool.get(self.v)
        assert v == self.v, f"worker order broken: wanted shard {self.v}, got {v}"
        for step, log in zip(_stateful_steps(self.mirror), changes):
            for method, args in log:
                getattr(step, method)(*args)
        for part, st in zip(pipeline_parts(self.mirror.docs), stats):
            part.stats.__init__()
            part.stats.merge(st)
        if "epoch" in light.get("docs", {}):
            self.mirror.docs.epoch = light["docs"]["epoch"]
        self.light = light
        return {k: torch.from_numpy(a) for k, a in window.items()}

    def state_dict(self) -> dict:
        if self.light is None:
            return self.mirror.state_dict()
        files = [src.reader.files for src in source_streams(self.mirror.docs)]
        return _fill_in(self.light, _stateful_steps(self.mirror), files)

    def load_state_dict(self, state: dict) -> None:
        self.mirror.load_state_dict(state)
        self.light = None
        self.pool.stop()  # restarted from the new position on the next window


class ShardWorkers:
    """The worker processes of one rank; shard ``owned[i]`` goes to worker ``i % workers``,
    and each worker sends its shards' windows in the order the trainer takes them."""

    def __init__(self, make_shard, owned: list[int], workers: int, prefetch: int, num_shards: int, position):
        """``position()``: rows of the global stream consumed so far (where the next window
        is needed from): after a resume each worker starts with the shard wanted first."""
        self.make_shard, self.owned, self.num_shards, self.position = make_shard, owned, num_shards, position
        self.workers, self.prefetch = min(workers, len(owned)), prefetch
        self.shards: dict[int, WorkerShard] = {}
        self.procs: list = []
        self.queues: list = []

    def shard(self, v: int, mirror: PackedStream) -> WorkerShard:
        self.shards[v] = WorkerShard(v, mirror, self)
        return self.shards[v]

    def _start(self) -> None:
        ctx = mp.get_context("spawn")  # the trainer has threads (torch, gloo): fork is unsafe
        self.queues, self.procs = [], []
        start = self.position() % self.num_shards
        order = sorted(self.owned, key=lambda v: (v - start) % self.num_shards)  # the trainer's next needs
        for w in range(self.workers):
            mine = set(self.owned[w::self.workers])
            ids = [v for v in order if v in mine]
            states = {v: self.shards[v].state_dict() for v in ids}
            q = ctx.Queue(maxsize=self.prefetch)
            p = ctx.Process(target=_worker, args=(self.make_shard, ids, states, q, os.getpid()), daemon=True)
            p.start()
            self.queues.append(q)
            self.procs.append(p)

    def get(self, v: int):
        if not self.procs:
            self._start()
        w = self.owned.index(v) % self.workers
        while True:
            try:
                return self.queues[w].get(timeout=10)
            except queue.Empty:
                if not self.procs[w].is_alive():
                    raise RuntimeError(f"data worker {w} (shards {self.owned[w::self.workers]}) exited with "
                                       f"code {self.procs[w].exitcode}; its error is printed above") from None

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join(timeout=10)
        for q in self.queues:
            q.close()
            q.cancel_join_thread()
        self.procs, self.queues = [], []
