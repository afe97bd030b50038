"""From records to training micro-batches: tokenize with the loss mask, split, pack, collate.

Every example becomes an ``(input, target)`` pair of equal length (target = next token, or
-100 where there is no loss), so packing never makes one example predict another's
first token. Packed rows carry ``doc_ids`` (example number inside the row) and
``position_ids`` restarting at 0 per example, which the model turns into block-causal
attention: a packed row gives every example exactly the loss it has alone. Padding uses
the tokenizer's PAD id and is never a target.

``RowStream`` is the endless, epoch-shuffled row sequence; its state is (epoch, index), so
resuming is exact. It plugs into ``train.data.GlobalBatchSlicer``, which gives every
rank its slice of the same global batch whatever the world size.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from data_pipeline.stream import split_of
from train.data import shard_validation
from train.sft.chat import encode_chat
from train.sft.records import BadRecord, Record, SkipCounter, read_records

IGNORE = -100


@dataclass
class Example:
    input: list[int]
    target: list[int]  # LM: next-token ids with IGNORE where masked; classification: unused
    label: int | None = None
    where: str = ""


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    labels: list[str] = field(default_factory=list)  # classification class names, index = class id
    counts: Counter = field(default_factory=Counter)  # what happened to the records (printed and tested)
    skipped: SkipCounter | None = None


def lm_example(rec: Record, tok, seq_len: int, mask: str, truncation: str, counts: Counter) -> Example | None:
    """The example of a conversation, or None when the truncation policy drops it (counted).

    Raises BadRecord when no token is a target: a silent zero loss would hide a wrong mask.
    """
    enc = encode_chat(tok, rec.messages, mask)
    ids, is_target = enc.ids, enc.target
    if len(ids) > seq_len + 1:
        if truncation == "drop":
            counts["dropped_too_long"] += 1
            return None
        ids, is_target = ids[: seq_len + 1], is_target[: seq_len + 1]
        counts["truncated"] += 1
        if not any(is_target[1:]):
            counts["dropped_truncated_to_no_target"] += 1
            return None
    if not any(is_target[1:]):
        raise BadRecord(rec.where, f"no trainable token under sft.mask={mask}")
    target = [t if m else IGNORE for t, m in zip(ids[1:], is_target[1:])]
    return Example(ids[:-1], target, where=rec.where)


def classification_example(rec: Record, tok, seq_len: int, truncation: str, label_id: dict,
                           counts: Counter) -> Example | None:
    """Text + EOS (the head reads the last token's state); too long: drop or keep the start."""
    ids = tok.encode(rec.text) + [tok.eos_id]
    if len(ids) > seq_len:
        if truncation == "drop":
            counts["dropped_too_long"] += 1
            return None
        ids = ids[: seq_len - 1] + [tok.eos_id]
        counts["truncated"] += 1
    key = str(rec.label)
    if key not in label_id:
        raise BadRecord(rec.where, f"label {rec.label!r} is not one of sft.labels {list(label_id)}")
    return Example(ids, [], label=label_id[key], where=rec.where)


def _content_key(rec: Record) -> str:
    return json.dumps(rec.messages if rec.messages is not None else [rec.text, rec.label], sort_keys=True)


def load_sft_data(cfg, tok, classification: bool) -> SFTData:
    """Read, check, split and tokenize the configured files (every rank does the same work)."""
    s, seq_len = cfg.sft, int(cfg.data.seq_len)
    skipped = SkipCounter(bool(s.skip_bad_records))
    records = read_records(list(s.paths), s, classification, skipped)
    if s.val_paths:
        train_recs, val_recs = records, read_records(list(s.val_paths), s, classification, skipped)
    else:
        train_recs, val_recs = [], []
        for r in records:
            (val_recs if split_of(_content_key(r), float(s.val_fraction)) == "val" else train_recs).append(r)
    counts: Counter = Counter(records=len(records) + (len(val_recs) if s.val_paths else 0))
    labels: list[str] = [str(x) for x in s.labels]
    if classification and not labels:
        labels = sorted({str(r.label) for r in train_recs})
    label_id = {name: i for i, name in enumerate(labels)}

    def convert(recs: list[Record]) -> list[Example]:
        out = []
        for r in recs:
            try:
                ex = (classification_example(r, tok, seq_len, s.truncation, label_id, counts) if classification
                      else lm_example(r, tok, seq_len, s.mask, s.truncation, counts))
            except BadRecord as e:
                skipped.handle(e)
                continue
            if ex is not None:
                out.append(ex)
        return out

    train, val = convert(train_recs), convert(val_recs)
    counts.update(train_examples=len(train), val_examples=len(val), skipped_bad=skipped.total)
    if not train:
        raise ValueError(f"sft.paths: no usable training example in {list(s.paths)} ({dict(counts)})")
    return SFTData(train, val, labels, counts, skipped)


def pack_rows(lengths: list[int], order, seq_len: int, packing: bool) -> list[list[int]]:
    """Rows of example indices, in ``order``: next-fit packing up to ``seq_len`` tokens."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = lengths[i]
        if packing and cur and used + n <= seq_len:
            cur.append(int(i))
            used += n
            continue
        if cur:
            rows.append(cur)
        cur, used = [int(i)], n
    if cur:
        rows.append(cur)
    return rows


class RowStream:
    """Endless rows (lists of examples), reshuffled and repacked every epoch."""

    def __init__(self, examples: list[Example], seq_len: int, packing: bool, seed: int):
        self.examples, self.seq_len, self.packing, self.seed = examples, seq_len, packing, seed
        self.lengths = [len(e.input) for e in examples]
        self.epoch, self.index = 0, 0
        self._rows: list[list[int]] | None = None

    def _epoch_rows(self) -> list[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        return pack_rows(self.lengths, order, self.seq_len, self.packing)

    def __iter__(self):
        return self

    def __next__(self) -> list[Example]:
        if self._rows is None:
            self._rows = self._epoch_rows()
        if self.index >= len(self._rows):
            self.epoch, self.index = self.epoch + 1, 0
            self._rows = self._epoch_rows()
        row = self._rows[self.index]
        self.index += 1
        return [self.examples[i] for i in row]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._rows = int(state["epoch"]), int(state["index"]), None


def collate_lm(rows: list[list[Example]], pad_id: int, packed: bool) -> dict:
    """Right-padded to the longest row; packed rows get doc_ids and per-example positions."""
    B, L = len(rows), max(sum(len(e.input) for e in row) for row in rows)
    inp = torch.full((B, L), pad_id, dtype=torch.long)
    tgt = torch.full((B, L), IGNORE, dtype=torch.long)
    doc = torch.full((B, L), -1, dtype=torch.long)  # padding is a document of its own
    pos = torch.zeros((B, L), dtype=torch.long)
    for b, row in enumerate(rows):
        off = 0
        for d, e in enumerate(row):
            n = len(e.input)
            inp[b, off:off + n] = torch.tensor(e.input)
            tgt[b, off:off + n] = torch.tensor(e.target)
            doc[b, off:off + n] = d
            pos[b, off:off + n] = torch.arange(n)
            off += n
    batch = {"input": inp, "target": tgt, "loss_tokens": int((tgt != IGNORE).sum()),
             "tokens": sum(len(e.input) for row in rows for e in row)}
    if packed:
        batch["model_kwargs"] = {"doc_ids": doc, "position_ids": pos}
    return batch


def collate_classification(rows: list[list[Example]], pad_id: int) -> dict:
    exs = [e for row in rows for e in row]
    B, L = len(exs), max(len(e.input) for e in exs)
    inp = torch.full((B, L), pad_id, dtype=torch.long)
    for b, e in enumerate(exs):
        inp[b, : len(e.input)] = torch.tensor(e.input)
    lengths = torch.tensor([len(e.input) for e in exs])
    return {"input": inp, "target": torch.tensor([e.label for e in exs]), "loss_tokens": B,
            "tokens": int(lengths.sum()), "model_kwargs": {"last_index": lengths - 1}}


def make_collate(pad_id: int, classification: bool, packed: bool) -> Callable[[list], dict]:
    if classification:
        return lambda rows: collate_classification(rows, pad_id)
    return lambda rows: collate_lm(rows, pad_id, packed)


def validation_batches(examples: list[Example], seq_len: int, packing: bool, collate, micro: int,
                       max_rows: int, rank: int, world: int) -> list[dict]:
    """The first ``max_rows`` held-out rows in file order, the same for any world size, split
    across ranks by ``train.data.shard_validation``."""
    rows = pack_rows([len(e.input) for e in examples], range(len(examples)), seq_len, packing)[:max_rows]
    return shard_validation([[examples[i] for i in row] for row in rows], micro, rank, world, collate)
