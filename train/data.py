"""How the trainer's ranks share the data stream.

``train.data_sharding=sequences`` (default): every rank reads the same global stream of
packed windows and keeps its slice of each global batch. The global batch of step k is
then the same windows whatever the world size, micro-batch size and accumulation, so
backends can be compared loss for loss, and a checkpoint resumes exactly on any number of
ranks (the stream state is global). The price is that every rank runs the pipeline on the
whole stream, which is cheap for prepared or pre-filtered data.

``train.data_sharding=shards``: the stream is cut into ``train.virtual_shards`` (V) fixed
shards, each its own pipeline (reader share, filters, dedup index) and packer with its own
state. Row g of the global stream (g counts rows over all steps) is the next window of
shard g mod V, so the global batch of step k does not depend on the world size N; rank r
builds and runs only the shards v with v mod N == r, 1/N of the pipeline work, and needs no
row of another rank. Any N dividing V resumes exactly: the checkpoint holds one state per
shard, whatever N was. Dedup then works within a shard (a copy in another shard survives).

``train.data_sharding=documents``: each rank reads a disjoint part of the input (whole
files, or every N-th record), so pipeline work is divided across ranks. Resuming on the
same number of ranks is exact; on a different number, each rank restarts its new shard at
the epoch the run had reached (documents of the interrupted epoch may be seen again).
"""

from __future__ import annotations

from data_pipeline import pipeline as data
from data_pipeline.stream import PackedStream, collate
from train.log import logger


class GlobalBatchSlicer:
    """Pulls one global batch of windows per optimizer step, yields this rank's micro-batches."""

    def __init__(self, windows, micro: int, accum: int, rank: int, world: int, collate_fn=collate):
        """``windows``: any resumable iterator of rows (packed windows; SFT rows with their own
        ``collate_fn``)."""
        self.windows, self.micro, self.accum, self.rank, self.world = windows, micro, accum, rank, world
        self.collate_fn = collate_fn
        self.pending: list[dict] = []

    def _fill(self) -> None:
        n = self.micro * self.accum * self.world
        if isinstance(self.windows, VirtualShards):  # this rank's rows come from its own shards
            rows = self.windows.rows_for_rank(n)
            self.pending = [self.collate_fn(rows[j * self.micro:(j + 1) * self.micro]) for j in range(self.accum)]
            return
        if hasattr(self.windows, "take_rows"):  # random access (token shards): read this rank's rows only
            mine = [(j * self.world + self.rank) * self.micro + t for j in range(self.accum) for t in range(self.micro)]
            rows = self.windows.take_rows(n, mine)
            step = [rows.get(i) for i in range(n)]
        else:
            step = [next(self.windows) for _ in range(n)]
        self.pending = []
        for j in range(self.accum):
            lo = (j * self.world + self.rank) * self.micro
            self.pending.append(self.collate_fn(step[lo : lo + self.micro]))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.pending:
            self._fill()
        return self.pending.pop(0)

    def close(self) -> None:
        if hasattr(self.windows, "close"):
            self.windows.close()

    def state_dict(self) -> dict:
        """The position between two optimizer steps (where checkpoints are taken). It is
        read only then: packing the stream state (with a dedup index, megabytes) every step
        would cost more than the step on a fast GPU."""
        if self.pending:
            raise RuntimeError("the data position is only defined between optimizer steps")
        return {"stream": self.windows.state_dict(), "consumed": 0, "global": True}

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state["stream"])
        self.pending = []
        if state.get("consumed"):  # written by older kiln versions mid-step
            self._fill()
            del self.pending[: state["consumed"]]

    @property
    def epoch(self) -> int:
        return getattr(getattr(self.windows, "docs", self.windows), "epoch", 0)


class VirtualShards:
    """The ``shards`` mode's stream on one rank (see the module docstring)."""

    def __init__(self, make_shard, num_shards: int, rank: int, world: int, workers: int = 0, prefetch: int = 8):
        """``make_shard(v)``: the packed window stream of shard v (picklable when ``workers``
        > 0: background processes build the shards, train/data_workers.py)."""
        if num_shards % world:
            from train.errors import ConfigError

            raise ConfigError("train.virtual_shards", f"{num_shards} shards cannot be split evenly over {world} "
                              f"ranks; use a multiple of {world} (kept for the whole run: it fixes the stream), "
                              "or train.data_sharding=sequences (any world size; every rank runs the whole "
                              "pipeline)")
        self.num_shards, self.rank, self.world = num_shards, rank, world
        owned = list(range(rank, num_shards, world))
        self.position = 0  # rows of the global stream consumed, over all ranks
        self.workers = None
        if workers > 0:
            from train.data_workers import ShardWorkers

            self.workers = ShardWorkers(make_shard, owned, workers, prefetch, num_shards, lambda: self.position)
            self.shards = {v: self.workers.shard(v, make_shard(v)) for v in owned}
        else:
            self.shards = {v: make_shard(v) for v in owned}

    def rows_for_rank(self, n: int) -> list:
        """This rank's rows among the next ``n`` global rows, in order (n / world of them)."""
        rows = [next(self.shards[g % self.num_shards]) for g in range(self.position, self.position + n)
                if g % self.num_shards % self.world == self.rank]
        self.position += n
        return rows

    def state_dict(self) -> dict:
        return {"virtual_shards": self.num_shards, "position": self.position,
                "shards": {str(v): s.state_dict() for v, s in self.shards.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("virtual_shards") != self.num_shards:
            from train.errors import ConfigError

            raise ConfigError("train.virtual_shards", f"the checkpoint's stream has {state.get('virtual_shards')} "
                              f"shards, this run {self.num_shards}; resume with the same value")
        self.position = state["position"]
        for v, s in self.shards.items():
            s.load_state_dict(state["shards"][str(v)])

    def close(self) -> None:
        """Stop the background workers, if any (they would outlive an os._exit)."""
        if self.workers is not None:
            self.workers.stop()

    @property
    def docs(self):
        """The document stream of this rank's first shard (epoch and report of the trainer)."""
        return next(iter(self.shards.values())).docs

    def pipeline_work(self) -> dict:
        """What this rank's readers passed to the pipeline: records and their bytes (the
        extraction and filters cost about in proportion to bytes)."""
        readers = [r for sh in self.shards.values() for r in _readers(sh.docs)]
        return {"documents": sum(r.stats.seen for r in readers), "bytes": sum(r.stats.bytes_seen for r in readers)}


class ShardFactory:
    """Builds virtual shard v's packed stream; picklable (plain config, tokenizer path), so a
    background worker process can build the same stream."""

    def __init__(self, data_cfg, tokenizer_path: str, num_shards: int):
        from omegaconf import OmegaConf

        self.data = OmegaConf.to_container(data_cfg, resolve=True) if OmegaConf.is_config(data_cfg) else data_cfg
        self.tokenizer_path, self.num_shards = tokenizer_path, num_shards
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def __call__(self, v: int) -> PackedStream:
        from omegaconf import OmegaConf

        from data_pipeline.tokenizer import Tokenizer

        if self._tok is None:
            self._tok = Tokenizer(self.tokenizer_path)
        cfg = OmegaConf.create(self.data)
        docs = data.document_stream(cfg, split="train", shard=v, num_shards=self.num_shards, loop=True,
                                    tokenizer=self._tok)
        return PackedStream(docs, self._tok, cfg.seq_len)


def _readers(docs) -> list:
    return [src.reader for src in data.source_streams(docs)]


def merge_shard_states(parts: list[dict]) -> dict:
    """The ranks' slicer states of a ``shards`` stream as one: each virtual shard once."""
    merged = {**parts[0], "stream": {**parts[0]["stream"], "shards": {}}}
    for p in parts:
        merged["stream"]["shards"].update(p["stream"]["shards"])
    return merged


def data_state(stream, backend) -> list[dict]:
    """The data position a checkpoint stores, collected from the ranks (every rank calls):
    one state for global streams (rank 0's, not N equal copies), one merged state holding
    each virtual shard once, or one state per rank for per-rank streams."""
    if isinstance(stream, GlobalBatchSlicer) and isinstance(stream.windows, VirtualShards):
        parts = backend.gather_object(stream.state_dict())  # dedup indexes: to rank 0 only
        return [merge_shard_states(parts)] if backend.is_main else []
    if is_global_stream(stream):
        return [stream.state_dict()] if backend.is_main else []
    return backend.one_per_data_rank(backend.all_gather_object(stream.state_dict()))


def shard_validation(rows: list, micro: int, rank: int, world: int, collate_fn=collate) -> list[dict]:
    """This rank's validation micro-batches from the global list of held-out ``rows``.

    Rank r takes rows r, r + world, r + 2*world, ...; the validation loss, a token-weighted
    mean over all ranks, is then that of one process over the same rows. Sharded backends
    (FSDP, ZeRO-3) gather parameters inside every forward, so every rank must run the same
    number of forwards: a rank with fewer rows runs extra batches that repeat the first row
    with ``loss_tokens`` 0, which count for nothing.
    """
    if not rows:
        return []
    mine = rows[rank::world]
    per_rank = -(-len(rows) // world)
    n_batches = -(-per_rank // micro)
    batches = [collate_fn(mine[lo:lo + micro]) for lo in range(0, len(mine), micro)]
    while len(batches) < n_batches:
        batches.append({**collate_fn(rows[:1]), "loss_tokens": 0})
    return batches


def validation_batches(cfg, tokenizer, rank: int, world: int) -> list[dict]:
    """Pretraining validation: ``train.eval_sequences`` held-out windows, split across ranks."""
    windows = data.validation_windows(cfg.data, tokenizer, cfg.train.eval_sequences)
    return shard_validation(windows, cfg.train.micro_batch_size, rank, world)


def build_train_stream(cfg, tokenizer, rank: int, world: int):
    t = cfg.train
    if data.is_token_data(cfg.data):
        return GlobalBatchSlicer(data.token_stream(cfg.data, "train"), t.micro_batch_size, t.grad_accum_steps,
                                 rank, world)
    if t.data_sharding == "shards":
        make_shard = ShardFactory(cfg.data, tokenizer.path, t.virtual_shards)
        shards = VirtualShards(make_shard, t.virtual_shards, rank, world, cfg.data.num_workers, cfg.data.prefetch)
        return GlobalBatchSlicer(shards, t.micro_batch_size, t.grad_accum_steps, rank, world)
    if t.data_sharding == "sequences":
        docs = data.document_stream(cfg.data, split="train", loop=True, tokenizer=tokenizer)
        return GlobalBatchSlicer(PackedStream(docs, tokenizer, cfg.data.seq_len), t.micro_batch_size,
                                 t.grad_accum_steps, rank, world)
    return data.train_batches(cfg.data, tokenizer, t.micro_batch_size, shard=rank, num_shards=world)


def starvation_warning(cfg, device) -> str | None:
    """Why this run's data may starve its accelerator, or None. The on-the-fly chain
    (WARC reading, extraction, filters, dedup, tokenizing) runs at about 65 records/s per
    core (docs/performance.md); on the training thread of a GPU run that is the bound on
    its speed. Prepared token shards, or background workers, take it off that thread."""
    if device.type != "cuda" or data.is_token_data(cfg.data):
        return None
    workers = int(cfg.data.num_workers)
    sharding = cfg.train.data_sharding
    if workers > 0 and sharding != "sequences":
        return None
    why = ("train.data_sharding=sequences reads one stream on the training thread of every rank" if workers
           else "data.num_workers=0: the on-the-fly data chain runs on the training thread")
    return (f"{why} (about 65 records/s per core), which will starve a GPU; prepare token shards once "
            "(launch/prepare_data.py, then data=prepared) or set data.num_workers to the cores per GPU "
            "with train.data_sharding=shards")


def is_global_stream(stream) -> bool:
    """True when every rank holds the same stream position (sequences mode, SFT rows)."""
    return isinstance(stream, GlobalBatchSlicer)


def restore_stream(stream, states: list[dict], rank: int, world: int) -> str:
    """Load the saved data state into ``stream``; returns a note on what was done."""
    if not states:
        return "no data state saved; starting the stream afresh"
    saved, now = _mode_of_state(states[0]), _mode_of_stream(stream)
    if saved != now:
        from train.errors import ConfigError

        raise ConfigError("train.data_sharding", f"the checkpoint's data position is of a {saved} stream, this run "
                          f"reads a {now} stream; resume with the data and train.data_sharding it was written with")
    if isinstance(stream, GlobalBatchSlicer):
        stream.load_state_dict(states[0])
        return "global stream restored exactly"
    if len(states) == world:
        stream.load_state_dict(states[rank])
        return "per-rank streams restored exactly"
    epoch = max(s["docs"]["epoch"] for s in states)
    stream.set_epoch(epoch)
    return f"{len(states)} data ranks then, {world} now: shards restart at epoch {epoch}"


class DataPosition:
    """The ``Stateful`` of the training stream's position: field ``data`` (``data_state``
    collects it from the ranks; ``restore_stream`` puts it back). A setting that does not
    fit the saved stream is a ConfigError naming the key; ``note`` says what the last load
    did."""

    fields = ("data",)

    def __init__(self, stream, backend):
        self.stream, self.b = stream, backend
        self.note = ""

    def state_dict(self) -> dict:
        return {"data": data_state(self.stream, self.b)}

    def load_state_dict(self, state: dict) -> None:
        self.note = restore_stream(self.stream, state.get("data", []), self.b.data_parallel_rank,
                                   self.b.data_parallel_size)
        if self.b.is_main:
            logger().info(f"resume: {self.note}")


def _mode_of_state(state: dict) -> str:
    if not state.get("global"):
        return "train.data_sharding=documents"
    inner = state.get("stream", {})
    if "virtual_shards" in inner:
        return "train.data_sharding=shards"
    return "train.data_sharding=sequences" if "docs" in inner else "row-addressed (tokenized shards, SFT rows)"


def _mode_of_stream(stream) -> str:
    if not isinstance(stream, GlobalBatchSlicer):
        return "train.data_sharding=documents"
    if isinstance(stream.windows, VirtualShards):
        return "train.data_sharding=shards"
    return "train.data_sharding=sequences" if isinstance(stream.windows, PackedStream) else "row-addressed (tokenized shards, SFT rows)"


def pipeline_steps(stream) -> list:
    """The reader and steps (with their stats) behind a training stream, in run order; empty
    when they live in DataLoader worker processes."""
    packed = getattr(stream, "windows", None) or getattr(stream, "stream", None)
    docs = getattr(packed, "docs", None)
    if docs is None or not all(hasattr(src, "reader") for src in data.source_streams(docs)):
        return []
    return data.pipeline_parts(docs)
