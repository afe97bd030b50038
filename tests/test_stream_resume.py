"""Streaming into the trainer: disjoint shards across ranks and workers, exact resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.loader import StreamingLoader
from data_pipeline.pipeline import source_stream, train_batches
from data_pipeline.stream import Batches


class ByteTok:
    eos_id = 2

    def encode(self, text, bos=False, eos=False):
        return ([1] if bos else []) + [b + 4 for b in text.encode()] + ([2] if eos else [])


def corpus(tmp_path, n_files: int = 1, n_docs: int = 60, dup_every: int = 7) -> DataConfig:
    rng = random.Random(0)
    paths = []
    for f in range(n_files):
        p = tmp_path / f"part{f}.jsonl"
        with open(p, "w") as fh:
            for i in range(n_docs):
                text = " ".join(f"word{rng.randrange(500)}" for _ in range(rng.randrange(5, 40)))
                if i % dup_every == 0 and i:
                    text = "the same duplicated text " * 3  # exercised by exact dedup (state in the checkpoint)
                fh.write(json.dumps({"id": f"f{f}d{i}", "text": text}) + "\n")
        paths.append(str(p))
    cfg = DataConfig(sources=[SourceConfig(name="web", paths=paths, format="jsonl")], seq_len=16, val_fraction=0.1)
    cfg.exact_dedup.enabled = True
    cfg.minhash_dedup.enabled = True
    return cfg


def json_roundtrip(state):
    return json.loads(json.dumps(state))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x["input"], y["input"]) and torch.equal(x["doc_ids"], y["doc_ids"])
                                    for x, y in zip(a, b))


def take(it, n):
    return [next(it) for _ in range(n)]


class DocsOfShard:
    """make_stream for the loader: one pass over a shard's documents (ids only)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, shard, num_shards):
        return source_stream(self.cfg, self.cfg.sources[0], split=None, shard=shard, num_shards=num_shards, loop=False)


@pytest.mark.parametrize("n_files", [1, 4])
def test_ranks_and_workers_read_disjoint_shards_that_cover_everything(tmp_path, n_files):
    cfg = corpus(tmp_path, n_files=n_files, n_docs=30, dup_every=10**9)
    everything = [d.id for d in source_stream(cfg, cfg.sources[0], loop=False)]
    seen = []
    for rank in range(2):
        seen += [d.id for d in StreamingLoader(DocsOfShard(cfg), num_workers=2, rank=rank, world=2)]
    assert len(seen) == len(set(seen)) == len(everything) == 30 * n_files
    assert set(seen) == set(everything)


def test_single_process_batches_resume_exactly(tmp_path):
    cfg = corpus(tmp_path, n_docs=12, dup_every=5)
    tok = ByteTok()
    b = train_batches(cfg, tok, micro_batch_size=3)
    assert isinstance(b, Batches)
    take(b, 7)
    state = json_roundtrip(b.state_dict())
    expected = take(b, 40)  # crosses epoch boundaries of this small corpus
    assert b.stream.docs.epoch >= 1
    r = train_batches(cfg, tok, micro_batch_size=3)
    r.load_state_dict(state)
    assert same(take(r, 40), expected)


def test_multi_worker_loader_resumes_with_the_same_batches(tmp_path):
    cfg = corpus(tmp_path, n_files=3)
    tok = ByteTok()
    uninterrupted = take(train_batches(cfg, tok, 2, num_workers=2), 15)
    a = train_batches(cfg, tok, 2, num_workers=2)
    assert isinstance(a, StreamingLoader)
    first = take(a, 5)  # odd: the next batch is worker 1's
    state = json_roundtrip(a.state_dict())
    assert state["next_worker"] == 1 and state["docs"]["epoch"] >= 0
    b = train_batches(cfg, tok, 2, num_workers=2)
    b.load_state_dict(state)
    assert same(first + take(b, 10), uninterrupted)


def test_loader_state_is_refused_with_another_worker_count(tmp_path):
    cfg = corpus(tmp_path)
    a = train_batches(cfg, ByteTok(), 2, num_workers=2)
    take(a, 1)
    with pytest.raises(ValueError, match="workers"):
        train_batches(cfg, ByteTok(), 2, num_workers=1).load_state_dict(a.state_dict())


def test_every_epoch_yields_the_same_documents_despite_dedup(tmp_path):
    cfg = corpus(tmp_path, n_docs=20, dup_every=4)
    s = source_stream(cfg, cfg.sources[0], loop=True)
    first_epoch = []
    while s.epoch == 0 or not first_epoch:
        doc = next(s)
        if s.epoch > 0:
            break
        first_epoch.append(doc.id)
    second = [doc.id] + [next(s).id for _ in range(len(first_epoch) - 1)]
    assert second == first_epoch and len(first_epoch) == 20 - 3  # 4 identical docs: 3 removed
