"""Exact and near-duplicate removal that works on an endless stream and survives restarts.

Streaming mode keeps a bounded index: at most ``capacity`` documents are remembered and,
when full, the OLDEST remembered document is forgotten first (FIFO eviction). A duplicate
is therefore caught when it arrives within ``capacity`` kept documents of its original;
farther repeats slip through. Crawls place most duplicates close together (mirrors and
boilerplate from the same snapshot), and a FIFO window keeps memory flat for a trainer
that runs for weeks. ``mode=global`` removes the bound, for offline preparation where one
process sees the whole shard set (``launch/prepare_data.py``).

The first occurrence is kept. The index starts empty at every epoch, so a second pass
over the same data yields the same documents as the first. With an audit attached
(``prepare_data --audit``) each remembered document's id and URL are remembered too, so
a duplicate's audit line names the document kept in its place (``kept_id``, ``kept_url``);
without one nothing more is held.

State (for trainer checkpoints) is the remembered keys in insertion order, packed as
little-endian int64 and base64-encoded: compact, and it survives both the trainer's JSON
state file and ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import re
import unicodedata
from collections import OrderedDict

import numpy as np
import xxhash

from data_pipeline.document import Document
from data_pipeline.step import PipelineStep

_MASK63 = (1 << 63) - 1


def _to_int64(x: int) -> int:
    return x & _MASK63


def pack(values) -> str:
    return base64.b64encode(np.asarray(values, dtype="<i8").tobytes()).decode("ascii")


def unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<i8")


class ExactDedup(PipelineStep):
    """Drops documents whose whitespace-normalised text was seen before (xxh3-64 hash)."""

    name = "exact_dedup"
    stateful = True

    def __init__(self, capacity: int | None = 1_000_000, mode: str = "streaming"):
        super().__init__()
        if mode not in ("streaming", "global"):
            raise ValueError(f"dedup mode must be streaming or global, got {mode!r}")
        self.capacity = None if mode == "global" else capacity
        self.seen: OrderedDict[int, None] = OrderedDict()
        self.kept: dict[int, tuple[str, str]] = {}  # key -> (id, url) of its document, when audited
        self.evicted = 0

    @staticmethod
    def key(text: str) -> int:
        return _to_int64(xxhash.xxh3_64_intdigest(" ".join(text.split()).encode("utf-8", "replace")))

    def process(self, doc: Document):
        k = self.key(doc.text)
        if k in self.seen:
            kept_id, kept_url = self.kept.get(k, ("", ""))
            return self.noted("exact_duplicate", kept_id=kept_id, kept_url=kept_url) if self.audit else "exact_duplicate"
        self._insert(k)
        if self.audit is not None:
            self.kept[k] = (doc.id, doc.url)
        return doc

    def _insert(self, k: int) -> None:
        self._record("_insert", k)
        self.seen[k] = None
        if self.capacity is not None and len(self.seen) > self.capacity:
            old, _ = self.seen.popitem(last=False)
            self.kept.pop(old, None)
            self.evicted += 1

    def new_epoch(self) -> None:
        self._record("new_epoch")
        self.seen.clear()
        self.kept.clear()

    def state_dict(self) -> dict:
        if self.mirror_id is not None:
            return {"mirrored": self.mirror_id}
        return {"keys": pack(list(self.seen)), "evicted": self.evicted}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.seen = OrderedDict((int(k), None) for k in unpack(state["keys"]).tolist())
        self.evicted = int(state.get("evicted", 0))


_NON_WORD = re.compile(r"[^\w\s]")


def simplify(text: str) -> str:
    """Lower-case, NFKC, punctuation removed and whitespace collapsed, so trivial edits
    (extra spaces, curly quotes, case) do not change the shingles."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_NON_WORD.sub(" ", text).split())


class MinHasher:
    """MinHash signatures of word n-gram shingles.

    Each shingle gets a 64-bit xxh64 hash; the ``num_hashes`` hash functions are
    multiply-shift hashes ``(a * x + b) mod 2^64 >> 32`` with odd ``a`` (a universal
    family), drawn from ``seed``, so signatures are identical across processes and runs.
    """

    def __init__(self, ngram: int = 5, num_bands: int = 14, rows_per_band: int = 8, seed: int = 1):
        self.ngram, self.num_bands, self.rows = ngram, num_bands, rows_per_band
        self.num_hashes = num_bands * rows_per_band
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, self.num_hashes, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, self.num_hashes, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        words = simplify(text).split()
        n = self.ngram
        if len(words) < n:
            grams = [" ".join(words)] if words else []
        else:
            grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        uniq = set(grams)
        return np.fromiter((xxhash.xxh64_intdigest(g.encode("utf-8", "replace")) for g in uniq),
                           dtype=np.uint64, count=len(uniq))

    def signature(self, text: str) -> np.ndarray | None:
        sh = self.shingles(text)
        if sh.size == 0:
            return None
        sig = np.full(self.num_hashes, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, sh.size, 4096):
                block = sh[start:start + 4096, None]
                h = (block * self.a[None, :] + self.b[None, :]) >> np.uint64(32)
                np.minimum(sig, h.min(axis=0), out=sig)
        return sig

    def band_keys(self, sig: np.ndarray) -> list[int]:
        r = self.rows
        return [_to_int64(xxhash.xxh64_intdigest(sig[i * r:(i + 1) * r].tobytes(), seed=i))
                for i in range(self.num_bands)]


class MinHashDedup(PipelineStep):
    """Near-duplicate removal with MinHash LSH (Broder 1997), FineWeb's setting by default:
    5-word shingles, 14 bands x 8 rows = 112 hashes. Two documents collide in a band with
    probability 1 - (1 - s^8)^14 for Jaccard similarity s: ~50% at s = 0.72, ~94% at s = 0.8.

    ``threshold`` > 0 additionally compares the full signatures of a colliding pair and
    only drops the document when the estimated Jaccard similarity reaches it; that costs
    ``num_hashes`` x 4 bytes more per remembered document. 0 (FineWeb) trusts the bands.
    """

    name = "minhash_dedup"
    stateful = True

    def __init__(self, ngram: int = 5, num_bands: int = 14, rows_per_band: int = 8, threshold: float = 0.0,
                 capacity: int | None = 1_000_000, mode: str = "streaming", seed: int = 1):
        super().__init__()
        if mode not in ("streaming", "global"):
            raise ValueError(f"dedup mode must be streaming or global, got {mode!r}")
        self.hasher = MinHasher(ngram, num_bands, rows_per_band, seed)
        self.threshold = threshold
        self.capacity = None if mode == "global" else capacity
        self._reset()

    def _reset(self) -> None:
        self.buckets: dict[int, int] = {}  # band key -> seq of the doc that holds it
        self.docs: OrderedDict[int, tuple[list[int], np.ndarray | None]] = OrderedDict()
        self.kept: dict[int, tuple[str, str]] = {}  # seq -> (id, url) of its document, when audited
        self.next_seq = 0
        self.evicted = 0

    def _match(self, keys: list[int], sig: np.ndarray) -> int | None:
        """The seq of a remembered document this one duplicates, or None."""
        for k in keys:
            seq = self.buckets.get(k)
            if seq is None:
                continue
            if self.threshold <= 0:
                return seq
            other = self.docs[seq][1]
            if float(np.mean(other == sig)) >= self.threshold:
                return seq
        return None

    def _add(self, keys: list[int], sig: np.ndarray | None) -> None:
        self._record("_add", keys, sig if self.threshold > 0 else None)
        seq = self.next_seq
        self.next_seq += 1
        self.docs[seq] = (keys, sig if self.threshold > 0 else None)
        for k in keys:
            self.buckets.setdefault(k, seq)
        if self.capacity is not None and len(self.docs) > self.capacity:
            old, (old_keys, _) = self.docs.popitem(last=False)
            self.kept.pop(old, None)
            for k in old_keys:
                if self.buckets.get(k) == old:
                    del self.buckets[k]
            self.evicted += 1

    def process(self, doc: Document):
        sig = self.hasher.signature(doc.text)
        if sig is None:
            return doc  # nothing to compare; empty texts are other filters' business
        keys = self.hasher.band_keys(sig)
        seq = self._match(keys, sig)
        if seq is not None:
            if self.audit is None:
                return "near_duplicate"
            kept_id, kept_url = self.kept.get(seq, ("", ""))
            return self.noted("near_duplicate", kept_id=kept_id, kept_url=kept_url)
        if self.audit is not None:
            self.kept[self.next_seq] = (doc.id, doc.url)
        self._add(keys, sig)
        return doc

    def new_epoch(self) -> None:
        self._record("new_epoch")
        self._reset()

    def state_dict(self) -> dict:
        if self.mirror_id is not None:
            return {"mirrored": self.mirror_id}
        keys = [k for k, _ in self.docs.values()]
        state = {"n": len(keys), "band_keys": pack(keys), "evicted": self.evicted}
        if self.threshold > 0:
            state["signatures"] = pack([s for _, s in self.docs.values()])
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._reset()
        n = state["n"]
        keys = unpack(state["band_keys"]).reshape(n, self.hasher.num_bands).tolist()
        sigs = unpack(state["signatures"]).reshape(n, self.hasher.num_hashes).astype(np.uint64) \
            if "signatures" in state else None
        for i, ks in enumerate(keys):
            self._add([int(k) for k in ks], sigs[i] if sigs is not None else None)
        self.evicted = int(state.get("evicted", 0))
