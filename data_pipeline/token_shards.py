"""Tokenized shards: flat token files written once, read by arithmetic at training time.

``launch/prepare_data.py --format tokens --tokenizer T`` writes, per input file,
``<name>.bin`` (every document's token ids followed by EOS, uint16 when the vocabulary
fits, else uint32), ``<name>.docs.npy`` (where each document ends, as token offsets),
``<name>.docs.jsonl.gz`` (each document's id and URL: what was kept, for the audit tools and
the cross-task dedup) and
the done marker ``<name>.bin.done`` (token and document counts, dtype, the tokenizer's
digest, the step stats), plus one copy of ``tokenizer.model`` for the directory.

At training time a source ``{format: tokens, paths: [<dir>]}`` is one token array: the
shards concatenated in name order, memory-mapped. It is cut into windows of seq_len + 1
tokens that overlap by one (as ``PackedStream`` does), so window ``w`` is tokens
``[w * T, w * T + T + 1)``. The last ``val_fraction`` of the windows is the validation
split. Training visits the train windows in a seeded pseudo-random order per epoch (a
keyed Feistel permutation: any position maps to its window in O(1), with no index array,
whatever the corpus size), so the stream position alone is the state, the global batch of
step k is a pure function of (seed, k), and a rank reads only its own rows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import torch

from data_pipeline.runner import read_done

TOKENIZER_FILE = "tokenizer.model"
_MASK64 = (1 << 64) - 1


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()


# Beside <name>.docs.npy: one {"id", "url"} line per document, in order, so a tokenized output
# still says which pages it kept (launch/why_dropped.py) and whose (launch/dedup_global.py).
DOCS_META_SUFFIX = ".docs.jsonl.gz"


def _write_shard(rows, out_prefix: str, dtype) -> tuple[int, int]:
    """``rows``: (id, url, token ids ending in EOS). Writes ``.bin``, ``.docs.npy`` and the
    documents' ids and URLs, each to a temporary name then renamed; returns (tokens, docs)."""
    import gzip

    pid = os.getpid()
    tmp_bin, tmp_meta = f"{out_prefix}.bin.tmp{pid}", f"{out_prefix}{DOCS_META_SUFFIX}.tmp{pid}"
    ends, n = [], 0
    with open(tmp_bin, "wb") as f, gzip.open(tmp_meta, "wt", encoding="utf-8", compresslevel=5) as meta:
        for doc_id, url, ids in rows:
            f.write(np.asarray(ids, dtype=dtype).tobytes())
            meta.write(json.dumps({"id": doc_id, "url": url}, ensure_ascii=False) + "\n")
            n += len(ids)
            ends.append(n)
    tmp_idx = f"{out_prefix}.docs.tmp{pid}.npy"
    np.save(tmp_idx, np.asarray(ends, dtype=np.int64))
    os.replace(tmp_idx, f"{out_prefix}.docs.npy")
    os.replace(tmp_meta, f"{out_prefix}{DOCS_META_SUFFIX}")
    os.replace(tmp_bin, f"{out_prefix}.bin")
    return n, len(ends)


def write_token_shard(docs, tokenizer, out_prefix: str) -> dict:
    """Tokenize ``docs`` into ``<out_prefix>.bin``, ``<out_prefix>.docs.npy`` and the documents'
    ids and URLs (``DOCS_META_SUFFIX``); returns the counts for the done marker."""
    dtype = token_dtype(tokenizer.vocab_size)
    rows = ((doc.id, doc.url, tokenizer.encode(doc.text, bos=False, eos=True)) for doc in docs)
    n, n_docs = _write_shard(rows, out_prefix, dtype)
    return {"tokens": n, "docs": n_docs, "dtype": np.dtype(dtype).name,
            "tokenizer": file_digest(tokenizer.path), "vocab_size": tokenizer.vocab_size}


def read_token_shard(bin_path: str):
    """The documents of one finished shard, in order: ``{"id", "url", "ids"}`` with ``ids``
    the token ids including the closing EOS. Shards written before the ids and URLs were
    kept get ``<file>:<n>`` ids and empty URLs."""
    import gzip

    manifest = read_done(bin_path)
    prefix = bin_path[: -len(".bin")]
    tokens = np.fromfile(bin_path, dtype=np.dtype(manifest["dtype"]))
    ends = np.load(prefix + ".docs.npy")
    meta_path = prefix + DOCS_META_SUFFIX
    meta = gzip.open(meta_path, "rt", encoding="utf-8") if os.path.exists(meta_path) else None
    try:
        start = 0
        for j, end in enumerate(ends.tolist()):
            row = json.loads(meta.readline()) if meta else {"id": f"{os.path.basename(bin_path)}:{j}", "url": ""}
            yield {"id": row["id"], "url": row["url"], "ids": tokens[start:end]}
            start = end
    finally:
        if meta:
            meta.close()


def write_token_rows(rows, out_prefix: str, manifest: dict) -> dict:
    """Rewrite a shard from ``read_token_shard`` rows (e.g. without duplicates), in the dtype
    and with the tokenizer of ``manifest`` (the source's done marker); returns the new counts."""
    n, n_docs = _write_shard(((r["id"], r["url"], r["ids"]) for r in rows), out_prefix,
                             np.dtype(manifest["dtype"]))
    return {**{k: manifest[k] for k in ("dtype", "tokenizer", "vocab_size")}, "tokens": n, "docs": n_docs}


def install_tokenizer(tokenizer_path: str, output_dir: str) -> None:
    """Put the tokenizer beside the shards (once); a different one already there is an error."""
    dst = os.path.join(output_dir, TOKENIZER_FILE)
    if os.path.exists(dst):
        if file_digest(dst) != file_digest(tokenizer_path):
            raise ValueError(f"{dst} differs from --tokenizer {tokenizer_path}: shards of one directory must share "
                             "one tokenizer")
        return
    tmp = f"{dst}.tmp{os.getpid()}"
    with open(tokenizer_path, "rb") as fi, open(tmp, "wb") as fo:
        fo.write(fi.read())
    os.replace(tmp, dst)


class TokenShards:
    """The finished shards under ``paths`` (directories or globs of ``.bin`` files) as one
    token array."""

    def __init__(self, paths: list[str]):
        files = []
        for p in paths:
            files += sorted(glob.glob(os.path.join(p, "*.bin"))) if os.path.isdir(p) else sorted(glob.glob(p))
        files = [f for f in files if os.path.exists(f + ".done")]
        if not files:
            raise FileNotFoundError(f"no finished token shards (<name>.bin with <name>.bin.done) in {paths}")
        self.files, self.arrays, starts, doc_ends = files, [], [0], []
        manifests = []
        for f in files:
            m = read_done(f)  # a corrupt marker: a ValueError naming it
            manifests.append(m)
            arr = np.memmap(f, dtype=np.dtype(m["dtype"]), mode="r") if m["tokens"] else np.zeros(0, np.uint16)
            if len(arr) != m["tokens"]:
                raise ValueError(f"{f}: {len(arr)} tokens on disk, its done marker says {m['tokens']}")
            ends = np.load(f[: -len(".bin")] + ".docs.npy")
            doc_ends.append(ends + starts[-1])
            self.arrays.append(arr)
            starts.append(starts[-1] + len(arr))
        digests = {m["tokenizer"] for m in manifests}
        if len(digests) > 1:
            raise ValueError(f"token shards in {paths} were written with {len(digests)} different tokenizers")
        self.tokenizer_digest = digests.pop()
        self.vocab_size = max(m["vocab_size"] for m in manifests)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.total = int(self.starts[-1])
        self.doc_ends = np.concatenate(doc_ends) if doc_ends else np.zeros(0, np.int64)
        first_dir = os.path.dirname(files[0])
        tok = os.path.join(first_dir, TOKENIZER_FILE)
        self.tokenizer_path = tok if os.path.isfile(tok) else None

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenation, as int64."""
        out = np.empty(stop - start, dtype=np.int64)
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            lo = pos - self.starts[i]
            take = min(stop - pos, len(self.arrays[i]) - lo)
            out[pos - start: pos - start + take] = self.arrays[i][lo: lo + take]
            pos += take
            i += 1
        return out

    def doc_ids(self, start: int, stop: int) -> np.ndarray:
        """For each token in [start, stop): which document of the window it belongs to (0, 1, ...)."""
        ids = np.searchsorted(self.doc_ends, np.arange(start, stop), side="right")
        return ids - ids[0]


def _mix(x: int, key: int) -> int:
    """splitmix64 of (x, key)."""
    z = (x + key * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def permute(i: int, n: int, key: int) -> int:
    """A keyed pseudo-random permutation of [0, n): a 4-round Feistel network on the next even
    power of two, cycle-walking back into range (fewer than 4 steps expected)."""
    if n <= 1:
        return 0
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half, mask = bits // 2, (1 << (bits // 2)) - 1
    x = i
    while True:
        left, right = x >> half, x & mask
        for r in range(4):
            left, right = right, left ^ (_mix(right, key * 4 + r) & mask)
        x = (left << half) | right
        if x < n:
            return x


class TokenWindows:
    """Windows of one ``TokenShards``: the train split in seeded shuffled order (endless), or
    the validation split in order (one pass). ``position`` is the whole state."""

    def __init__(self, shards: TokenShards, seq_len: int, split: str, val_fraction: float, seed: int):
        self.shards, self.seq_len, self.split, self.seed = shards, seq_len, split, seed
        n = max(0, (shards.total - 1) // seq_len)
        n_val = int(round(n * val_fraction))
        self.first, self.count = (0, n - n_val) if split == "train" else (n - n_val, n_val)
        if split == "train" and self.count == 0:
            raise ValueError(f"token shards {shards.files[:3]}: {shards.total} tokens give no training window of "
                             f"{seq_len + 1} tokens")
        self.position = 0

    @property
    def epoch(self) -> int:
        return self.position // self.count if self.count else 0

    def window_index(self, position: int) -> int:
        if self.split != "train":
            return self.first + position
        epoch, offset = divmod(position, self.count)
        return self.first + permute(offset, self.count, _mix(self.seed, epoch))

    def row(self, position: int) -> dict:
        start = self.window_index(position) * self.seq_len
        stop = start + self.seq_len + 1
        return {"tokens": torch.from_numpy(self.shards.tokens(start, stop)),
                "doc_ids": torch.from_numpy(self.shards.doc_ids(start, stop))}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.split != "train" and self.position >= self.count:
            raise StopIteration
        row = self.row(self.position)
        self.position += 1
        return row

    def take_rows(self, n: int, wanted) -> dict[int, dict]:
        """Advance by ``n`` windows, reading only those at the offsets in ``wanted``."""
        rows = {i: self.row(self.position + i) for i in wanted}
        self.position += n
        return rows

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class TokenMixture:
    """Several token sources by weight. Every window holds seq_len tokens, so window shares
    are token shares; a smooth weighted round robin picks the source of each position, which
    keeps every prefix of the stream within one window of the weights, deterministically."""

    def __init__(self, streams: list[TokenWindows], weights: list[float]):
        total = float(sum(weights))
        self.streams, self.weights = streams, [w / total for w in weights]
        self.credit = [0.0] * len(streams)

    def _pick(self) -> int:
        for k, w in enumerate(self.weights):
            self.credit[k] += w
        k = max(range(len(self.streams)), key=lambda j: self.credit[j])
        self.credit[k] -= 1.0
        return k

    @property
    def epoch(self) -> int:
        return min(s.epoch for s in self.streams)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.streams[self._pick()])

    def take_rows(self, n: int, wanted) -> dict[int, dict]:
        wanted, rows = set(wanted), {}
        for i in range(n):
            s = self.streams[self._pick()]
            if i in wanted:
                rows[i] = s.row(s.position)
            s.position += 1
        return rows

    def state_dict(self) -> dict:
        return {"positions": [s.position for s in self.streams], "credit": list(self.credit)}

    def load_state_dict(self, state: dict) -> None:
        for s, p in zip(self.streams, state["positions"]):
            s.position = int(p)
        self.credit = [float(c) for c in state["credit"]]
