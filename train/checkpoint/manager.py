"""A run's checkpoints across ranks: where it resumes from, and saves that do not stall
training.

The run hands the manager its pieces of state once (``track``: train/checkpoint/state.py):
the weights and optimizer, which write their own files, the small ``Stateful`` pieces
(progress, data position, RNG), whose fields make trainer_state.json, and rank 0's
description files (config, tokenizer, task files). ``load`` puts a checkpoint back into
every piece.

Saving has two halves. ``start`` (every rank, on the training thread) collects the small
pieces' state (rank 0 writes it and the description files at once) and has the weights
piece write the weights and optimizer, in the background where ``background`` is on
and the backend can (DCP's ``async_save`` under FSDP, a host copy written by a thread under
single/DDP; DeepSpeed writes synchronously). Each rank then fsyncs and hashes the files it
wrote, in a thread of its own, so no rank hashes another's shards. ``poll`` (every rank,
once per step while a save is in flight: one small collective) commits when every rank is
done: rank 0 merges the ranks' manifest entries, writes meta.json, renames the directory
into place, moves ``latest`` and prunes. Until that commit the previous checkpoint stays
the resume point, so a crash or ``kill -9`` at any moment of a save loses only that save.

Resuming verifies the chosen checkpoint the same way: rank 0 decides, and every rank
hashes its share of the files (``SharedHashing``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from train.checkpoint.layout import TRAINER_STATE, CheckpointError, writer_rank
from train.checkpoint.manifest import files_of, hash_entries, local_hashes
from train.checkpoint.reading import read_meta, read_trainer_state
from train.checkpoint.state import FileState, Stateful
from train.checkpoint.store import (
    begin,
    clean_stale,
    commit,
    describe_skipped,
    resolve,
    select,
    wait_for_deletions,
    write_json_atomic,
)
from train.checkpoint.writing import background_writer
from train.errors import ConfigError
from train.log import logger


def share_of(rels: list[str], sizes: list[int], world: int) -> list[int]:
    """The rank that hashes each file: its writer where the name says (``writer_rank``),
    else the least-loaded rank so far, largest files first."""
    owner = [-1] * len(rels)
    load = [0] * world
    for i, rel in enumerate(rels):
        r = writer_rank(rel)
        if r is not None:
            owner[i] = r % world
            load[owner[i]] += sizes[i]
    for i in sorted(range(len(rels)), key=lambda i: -sizes[i]):
        if owner[i] < 0:
            owner[i] = min(range(world), key=lambda r: load[r])
            load[owner[i]] += sizes[i]
    return owner


class SharedHashing:
    """Checksums of files computed by every rank, each its share: rank 0 calls it (as the
    ``hash_files`` of ``verify``/``select``/``resolve``) while the other ranks ``serve``;
    rank 0's ``close`` ends the serving."""

    def __init__(self, backend):
        self.b = backend

    def __call__(self, paths: list[str]) -> dict[str, str]:
        return self._round(self.b.broadcast_object(list(paths)))

    def _round(self, paths: list[str]) -> dict[str, str]:
        owner = share_of(paths, [os.path.getsize(p) for p in paths], self.b.world_size)
        mine = local_hashes([p for p, r in zip(paths, owner) if r == self.b.rank])
        merged: dict[str, str] = {}
        for part in self.b.all_gather_object(mine):
            merged.update(part)
        return merged

    def serve(self) -> None:
        while (paths := self.b.broadcast_object(None)) is not None:
            self._round(paths)

    def close(self) -> None:
        self.b.broadcast_object(None)


@dataclass
class _Pending:
    step: int
    tmp: str
    meta: dict
    hashed: object  # Future of this rank's manifest entries
    writing: object  # the backend's Writing (its own waits count as blocked time)
    started: float
    blocked_s: float = 0.0
    stats: dict = field(default_factory=dict)
    # Where the blocked time went (seconds): starting the save, waiting for its writers,
    # committing it. The backend's own waits (FSDP staging) are added as "staging".
    parts: dict = field(default_factory=dict)


class CheckpointManager:
    """The checkpoints under ``root`` of one run, for every rank of it."""

    def __init__(self, backend, root: str, verify_mode: str, keep_last: int, background: bool):
        self.b, self.root = backend, root
        self.verify_mode, self.keep_last, self.background = verify_mode, keep_last, background
        self.pending: Optional[_Pending] = None
        self.weights: Optional[FileState] = None
        self.states: dict[str, Stateful] = {}
        self.describe: Callable[[str], None] = lambda directory: None

    def track(self, weights: FileState, states: dict[str, Stateful], describe: Callable[[str], None]) -> None:
        """The run's pieces of state: ``weights`` (weights and optimizer, files in the
        backend's format), ``states`` (small pieces, each owning fields of
        trainer_state.json; no field may have two owners) and ``describe(directory)``,
        rank 0's files that describe the run (config, tokenizer, task files)."""
        owners: dict[str, str] = {}
        for name, piece in states.items():
            for f in piece.fields:
                if f in owners:
                    raise ValueError(f"field {f!r} of trainer_state.json has two owners: {owners[f]!r} and {name!r}")
                owners[f] = name
        self.weights, self.states, self.describe = weights, dict(states), describe

    def load(self, path: str) -> None:
        """A (verified) checkpoint into every piece (every rank calls): weights and
        optimizer first, then each small piece its own fields. A field that does not load
        is a CheckpointError naming the file and field; a setting of this run that does not
        fit it (train.data_sharding, ...) stays the ConfigError naming the key."""

        self.weights.load(path, read_meta(path))
        state = read_trainer_state(path)
        file = os.path.join(path, TRAINER_STATE)
        for piece in self.states.values():
            try:
                piece.load_state_dict({f: state[f] for f in piece.fields if f in state})
            except ConfigError:
                raise
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError) as e:
                named = ("field " if len(piece.fields) == 1 else "fields ") + ", ".join(f"'{f}'" for f in piece.fields)
                raise CheckpointError(f"{file}: {named} does not restore into rank {self.b.rank} of this run "
                                      f"({type(e).__name__}: {e})") from None

    # -- resume -----------------------------------------------------------------------
    def resume_point(self, resume: str) -> Optional[str]:
        """The checkpoint to continue from (every rank calls; every rank gets the same path
        or the same CheckpointError): ``resume=<dir>`` as given, or with ``auto`` the newest
        under the root that verifies, those skipped printed with the reason. Only a start
        that goes ahead cleans the root of interrupted saves."""
        b = self.b
        hashing = SharedHashing(b)
        if not b.is_main:
            hashing.serve()
            status, value = b.broadcast_object(None)
        else:
            error = None
            try:
                found = ("ok", self._choose(resume, hashing))
            except Exception as e:  # every rank must hear of it, or the others wait for ever
                found, error = ("error", str(e)), e
            finally:
                hashing.close()
            if error is None:
                for stale in clean_stale(self.root):
                    logger().info(f"removed {stale}, left by an interrupted save")
            status, value = b.broadcast_object(found)
            if error is not None:
                raise error
        if status == "error":
            raise CheckpointError(value)
        return value

    def _choose(self, resume: str, hashing: SharedHashing) -> Optional[str]:
        if resume == "none":
            return None
        if resume != "auto":
            return resolve(resume, self.verify_mode, hashing)
        path, skipped = select(self.root, self.verify_mode, hashing)
        if skipped and path is None:
            raise CheckpointError(
                f"resume=auto: {len(skipped)} checkpoint(s) under {self.root}, and none verifies:\n"
                f"{describe_skipped(skipped)}\nNothing was changed. Restore them, resume from another "
                "one with resume=<dir>, or start afresh with resume=none (its checkpoints replace these).")
        if skipped:
            logger().warning(f"resume: skipped {len(skipped)} newer checkpoint(s) that do not verify:\n"
                             f"{describe_skipped(skipped)}\nresume: continuing from {path}")
        return path

    # -- saving -----------------------------------------------------------------------
    def start(self, step: int, meta: dict) -> None:
        """Begin the save of ``step`` (every rank): the small pieces' state and the
        description files are written at once by rank 0, the weights piece writes in the
        background where it can. A save still in flight is finished first: one at a time."""
        self.wait()
        b = self.b
        t0 = time.perf_counter()
        fields: dict = {}
        for piece in self.states.values():  # every rank: collecting some pieces is collective
            fields.update(piece.state_dict())
        tmp = b.broadcast_object(begin(self.root, step) if b.is_main else None)
        writing = self.weights.save(tmp, self.background)
        if b.is_main:
            write_json_atomic(os.path.join(tmp, TRAINER_STATE), fields)
            self.describe(tmp)
        def hash_mine() -> tuple[dict, float]:
            writing.wait()
            h0 = time.perf_counter()
            # This rank's own shards; rank 0 also takes every shared file (it wrote them).
            mine = [rel for rel in files_of(tmp) if (writer_rank(rel) or 0) % b.world_size == b.rank]
            return hash_entries(tmp, mine), time.perf_counter() - h0

        hashed = background_writer().submit(hash_mine)
        self.pending = _Pending(step, tmp, dict(meta), hashed, writing, t0)
        self.pending.blocked_s = self.pending.parts["start"] = time.perf_counter() - t0

    def poll(self) -> Optional[tuple[str, dict]]:
        """Commit the save in flight if every rank has written and hashed its files (every
        rank calls); returns (committed path, stats) or None."""
        if self.pending is None:
            return None
        if not all(self.b.all_gather_object(self.pending.hashed.done())):
            return None
        return self._commit()

    def wait(self) -> Optional[tuple[str, dict]]:
        """Finish the save in flight, if any, and the deletion of what its commit pruned
        (every rank calls)."""
        if self.pending is None:
            wait_for_deletions()
            return None
        from concurrent.futures import wait

        t0 = time.perf_counter()
        wait([self.pending.hashed])  # a writer's error is raised by _commit, on every rank
        self.pending.parts["write_wait"] = dt = time.perf_counter() - t0
        self.pending.blocked_s += dt
        path, stats = self._commit()
        t1 = time.perf_counter()
        wait_for_deletions()  # here the caller waits for the pruning too: training time the save took
        stats["blocked_deletions_s"] = dt = time.perf_counter() - t1
        stats["blocked_s"] += dt
        return path, stats

    def _commit(self) -> tuple[str, dict]:
        p, b = self.pending, self.b
        self.pending = None
        t0 = time.perf_counter()
        try:
            entries, hash_s, error = *p.hashed.result(), None
        except Exception as e:  # a writer's error: every rank must hear of it
            entries, hash_s, error = {}, 0.0, f"{type(e).__name__}: {e}"
        parts = b.all_gather_object((entries, hash_s, error))
        failed = [f"rank {r}: {err}" for r, (_, _, err) in enumerate(parts) if err]
        if failed:
            raise CheckpointError(f"the checkpoint of step {p.step} could not be written ({'; '.join(failed)}); "
                                  f"{p.tmp} is left for the next start to remove, the previous checkpoint stands")
        final = None
        if b.is_main:
            files: dict = {}
            for part, _, _ in parts:
                files.update(part)
            final = commit(self.root, p.tmp, p.step, p.meta, self.keep_last, self.verify_mode, files)
        final = b.broadcast_object(final)
        commit_s = time.perf_counter() - t0
        stats = {"step": p.step, "hash_s_per_rank": [h for _, h, _ in parts],
                 "blocked_s": p.blocked_s + p.writing.blocked_s + commit_s,
                 **{f"blocked_{k}_s": v for k, v in {**p.parts, "staging": p.writing.blocked_s,
                                                     "commit": commit_s}.items()},
                 "durable_after_s": time.perf_counter() - p.started}
        return final, stats
