"""Exact and MinHash dedup: what counts as a duplicate, bounded memory, checkpointable state."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch

from data_pipeline.dedup import ExactDedup, MinHashDedup, MinHasher
from data_pipeline.document import Document


def d(text: str, i: int = 0) -> Document:
    return Document(id=str(i), text=text)


def kept(step, texts) -> list[int]:
    return [i for i, t in enumerate(texts) if step.run_one(d(t, i)) is not None]


def article(seed: int, n: int = 300) -> str:
    rng = random.Random(seed)
    words = [f"w{rng.randrange(5000)}" for _ in range(n)]
    return " ".join(words)


def edit(text: str, changes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = f"changed{rng.randrange(10**6)}"
    return " ".join(words)


def roundtrip(state: dict) -> dict:
    """Through the trainer's JSON state file and through torch.load(weights_only=True)."""
    state = json.loads(json.dumps(state))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_exact_dedup_ignores_whitespace_but_not_content():
    s = ExactDedup()
    assert kept(s, ["a b  c", "a b c\n", "a b d"]) == [0, 2]
    assert s.stats.removed_by_reason["exact_duplicate"] == 1


def test_exact_dedup_fifo_eviction_forgets_the_oldest():
    s = ExactDedup(capacity=2)
    assert kept(s, ["A", "B", "C", "A", "C"]) == [0, 1, 2, 3]  # A was evicted by C; C still remembered
    s = ExactDedup(capacity=2, mode="global")  # global ignores the capacity
    assert kept(s, ["A", "B", "C", "A"]) == [0, 1, 2]


def test_exact_dedup_state_survives_a_checkpoint():
    s = ExactDedup(capacity=3)
    kept(s, ["A", "B", "C", "D"])
    t = ExactDedup(capacity=3)
    t.load_state_dict(roundtrip(s.state_dict()))
    # remembered at the save: B, C, D (A was evicted). B is a duplicate; A is new and evicts B; C is still known
    assert kept(t, ["B", "A", "C"]) == [1]
    assert kept(s, ["B", "A", "C"]) == [1]  # the uninterrupted index decides the same


def test_exact_dedup_forgets_at_a_new_epoch():
    s = ExactDedup()
    kept(s, ["A"])
    s.new_epoch()
    assert kept(s, ["A"]) == [0]


def test_minhash_defaults_are_finewebs():
    m = MinHashDedup()
    assert (m.hasher.ngram, m.hasher.num_bands, m.hasher.rows, m.hasher.num_hashes) == (5, 14, 8, 112)


def test_minhash_drops_near_duplicates_and_keeps_distinct_documents():
    base = article(1)
    texts = [base, edit(base, 3, seed=1), article(2), edit(base, 5, seed=2).upper(), article(3)]
    assert kept(MinHashDedup(), texts) == [0, 2, 4]


def test_minhash_keeps_documents_that_share_only_half_their_shingles():
    base = article(1, 400)
    words = base.split()
    half = " ".join(words[:200] + article(9, 200).split())  # Jaccard of 5-gram sets ~ 1/3
    assert kept(MinHashDedup(), [base, half]) == [0, 1]


def test_minhash_threshold_verifies_band_collisions():
    base = article(4)
    near = edit(base, 10, seed=3)  # about 85% of the shingles survive 10 edits
    sig_a, sig_b = MinHasher().signature(base), MinHasher().signature(near)
    est = float(np.mean(sig_a == sig_b))
    assert 0.6 < est < 0.95
    assert kept(MinHashDedup(threshold=0.0), [base, near]) == [0]
    assert kept(MinHashDedup(threshold=est), [base, near]) == [0]
    assert kept(MinHashDedup(threshold=min(1.0, est + 0.05)), [base, near]) == [0, 1]


def test_minhash_signatures_are_deterministic_across_instances():
    a, b = MinHasher(seed=1).signature(article(5)), MinHasher(seed=1).signature(article(5))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, MinHasher(seed=2).signature(article(5)))


def test_minhash_capacity_bounds_memory_with_fifo_eviction():
    m = MinHashDedup(capacity=2)
    texts = [article(10), article(11), article(12), edit(article(10), 2), edit(article(12), 2)]
    assert kept(m, texts) == [0, 1, 2, 3]  # 10 was evicted, 12 is still remembered
    assert len(m.docs) == 2 and m.evicted == 2
    assert len(m.buckets) <= 2 * 14


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_minhash_state_survives_a_checkpoint(threshold):
    m = MinHashDedup(capacity=3, threshold=threshold)
    kept(m, [article(20), article(21), article(22), article(23)])
    state = roundtrip(m.state_dict())
    assert state["n"] == 3 and len(state["band_keys"]) < 3 * 14 * 8 * 2  # packed int64, base64
    r = MinHashDedup(capacity=3, threshold=threshold)
    r.load_state_dict(state)
    later = [edit(article(20), 2), edit(article(22), 2), article(24)]
    assert kept(r, later) == [0, 2]
    assert kept(m, later) == [0, 2]  # the same decision as the uninterrupted index


def test_minhash_empty_text_is_passed_through():
    assert kept(MinHashDedup(), ["", ""]) == [0, 1]
