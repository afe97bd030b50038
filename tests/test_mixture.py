"""Mixtures: token shares follow the weights, draws are seeded, small sources are upsampled,
and the whole mixture resumes exactly."""

from __future__ import annotations

import json
import random

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.mixture import MixtureStream
from data_pipeline.pipeline import document_stream


class ByteTok:
    """Bytes as tokens (ids 4..259), EOS = 2: enough to count and pack tokens in tests."""

    eos_id = 2

    def encode(self, text, bos=False, eos=False):
        return ([1] if bos else []) + [b + 4 for b in text.encode()] + ([2] if eos else [])


def write_source(path, n: int, words: int, tag: str, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = max(1, int(words * rng.uniform(0.5, 1.5)))
            f.write(json.dumps({"id": f"{tag}{i}", "text": " ".join(f"{tag}w{rng.randrange(999)}" for _ in range(k))}) + "\n")
    return str(path)


def mix_cfg(tmp_path, weights=(0.7, 0.3), sizes=((400, 4), (200, 80)), seed=1234) -> DataConfig:
    srcs = []
    for i, ((n, words), w) in enumerate(zip(sizes, weights)):
        p = write_source(tmp_path / f"s{i}.jsonl", n, words, tag=f"s{i}_", seed=i)
        srcs.append(SourceConfig(name=f"s{i}", paths=[p], format="jsonl", weight=w))
    return DataConfig(sources=srcs, seed=seed, val_fraction=0.0)


def take(stream, n):
    return [next(stream).id for _ in range(n)]


def test_token_shares_match_weights_despite_different_document_lengths(tmp_path):
    cfg = mix_cfg(tmp_path)  # source 0: ~4-word docs, source 1: ~80-word docs (20x longer)
    m = document_stream(cfg, tokenizer=ByteTok())
    assert isinstance(m, MixtureStream)
    while sum(m.tokens) < 300_000:
        next(m)
    shares = m.token_shares()
    assert abs(shares["s0"] - 0.7) < 0.01 and abs(shares["s1"] - 0.3) < 0.01
    assert m.docs[0] > 10 * m.docs[1]  # many more short documents were needed for their share


def test_equal_weights_give_equal_token_shares(tmp_path):
    m = document_stream(mix_cfg(tmp_path, weights=(1.0, 1.0)))  # byte lengths without a tokenizer
    while sum(m.tokens) < 200_000:
        next(m)
    assert abs(m.token_shares()["s0"] - 0.5) < 0.01


def test_sampling_is_deterministic_for_a_seed(tmp_path):
    cfg = mix_cfg(tmp_path)
    a, b = take(document_stream(cfg), 300), take(document_stream(cfg), 300)
    assert a == b
    cfg.seed = 99
    assert take(document_stream(cfg), 300) != a


def test_small_source_is_upsampled_over_epochs(tmp_path):
    cfg = mix_cfg(tmp_path, weights=(0.5, 0.5), sizes=((3, 20), (500, 20)))
    m = document_stream(cfg)
    ids = take(m, 400)
    small = [i for i in ids if i.startswith("s0_")]
    assert len(small) > 100 and set(small) == {"s0_0", "s0_1", "s0_2"}
    assert m.streams[0].epoch > 30 and m.streams[1].epoch == 0
    assert m.epoch == 0  # the mixture's epoch is its slowest source's


def test_one_pass_mixture_reads_every_document_once(tmp_path):
    cfg = mix_cfg(tmp_path, sizes=((30, 4), (20, 10)))
    ids = [d.id for d in document_stream(cfg, loop=False)]
    assert sorted(ids) == sorted([f"s0_{i}" for i in range(30)] + [f"s1_{i}" for i in range(20)])


def test_mixture_resumes_exactly_from_its_state(tmp_path):
    cfg = mix_cfg(tmp_path, sizes=((50, 4), (40, 30)))
    m = document_stream(cfg, tokenizer=ByteTok())
    take(m, 123)
    state = json.loads(json.dumps(m.state_dict()))  # the trainer keeps data state in JSON
    expected = take(m, 200)
    r = document_stream(cfg, tokenizer=ByteTok())
    r.load_state_dict(state)
    assert take(r, 200) == expected
