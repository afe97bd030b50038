"""From documents to fixed-length training sequences, resumably.

``DocumentStream`` runs a reader through the pipeline steps, keeps one split (train or
validation, chosen by a stable hash of the document id) and loops over epochs.
``PackedStream`` tokenizes, appends EOS after every document and cuts the token stream
into windows of ``seq_len + 1`` tokens that overlap by one, so that every token is an
input exactly once and a target exactly once. Both have ``state_dict`` /
``load_state_dict``; the state is only ever read between two ``next`` calls, when the
reader position, the step states and the pack buffer are consistent with each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import torch

from data_pipeline.document import Document
from data_pipeline.readers.base import Reader
from data_pipeline.step import PipelineStep


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a stable ``val_fraction`` of documents, else 'train'."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return "val" if (h % 1_000_000) < val_fraction * 1_000_000 else "train"


class DocumentStream:
    def __init__(self, reader: Reader, steps: Sequence[PipelineStep], split: str | None = None,
                 val_fraction: float = 0.0, loop: bool = True):
        self.reader, self.steps = reader, list(steps)
        self.split, self.val_fraction, self.loop = split, val_fraction, loop
        self.epoch = 0
        self._it: Iterator[Document] | None = None

    def _chain(self) -> Iterator[Document]:
        while True:
            docs: Iterator[Document] = iter(self.reader)
            for step in self.steps:
                docs = step(docs)
            produced = False
            for doc in docs:
                if self.split is None or split_of(doc.id, self.val_fraction) == self.split:
                    produced = True
                    yield doc
            if not self.loop:
                return
            if not produced and self.epoch > 0:
                raise RuntimeError(f"data stream produced no {self.split or ''} document in a whole epoch: "
                                   f"{self.removal_summary()}")
            self.epoch += 1
            self.reader.reset()
            for step in self.steps:
                step.new_epoch()

    def removal_summary(self) -> str:
        """Where documents went: each step's kept/seen and its main removal reasons."""
        parts = []
        for s in (self.reader, *self.steps):
            st = s.stats
            top = ", ".join(f"{r} {n}" for r, n in st.removed_by_reason.most_common(4))
            parts.append(f"{s.name} kept {st.kept}/{st.seen}" + (f" (removed: {top})" if top else ""))
        files = f"{len(self.reader.files)} input file(s)"
        split = f"; the rest is in other splits (data.val_fraction={self.val_fraction})" if self.split else ""
        return f"{files}; " + "; ".join(parts) + split

    def __iter__(self):
        return self

    def __next__(self) -> Document:
        if self._it is None:
            self._it = self._chain()
        return next(self._it)

    def state_dict(self) -> dict:
        return {"reader": self.reader.state_dict(), "epoch": self.epoch,
                "steps": {s.name: s.state_dict() for s in self.steps}}

    def load_state_dict(self, state: dict) -> None:
        self.reader.load_state_dict(state["reader"])
        self.epoch = state["epoch"]
        for s in self.steps:
            s.load_state_dict(state["steps"].get(s.name, {}))
        self._it = None


class PackedStream:
    """Yields dicts with ``tokens`` (seq_len + 1,) and ``doc_ids`` (seq_len + 1,) tensors.

    ``doc_ids`` numbers the documents inside a window (0, 1, ...): the boundaries that
    document-masked attention and per-document positions need.
    """

    def __init__(self, docs, tokenizer, seq_len: int, add_bos: bool = False):
        self.docs, self.tok, self.seq_len, self.add_bos = docs, tokenizer, seq_len, add_bos
        self.buffer: list[int] = []
        self.buffer_docs: list[int] = []
        self.doc_counter = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        need = self.seq_len + 1
        while len(self.buffer) < need:
            doc = next(self.docs)  # StopIteration ends a finite stream
            ids = doc.metadata.pop("token_ids", None)  # already tokenized by a token-counting mixture
            if ids is None or self.add_bos:
                ids = self.tok.encode(doc.text, bos=self.add_bos, eos=True)
            self.buffer.extend(ids)
            self.buffer_docs.extend([self.doc_counter] * len(ids))
            self.doc_counter += 1
        tokens = torch.tensor(self.buffer[:need], dtype=torch.long)
        doc_ids = torch.tensor(self.buffer_docs[:need], dtype=torch.long)
        # Keep the last token: it is the next window's first input.
        del self.buffer[: need - 1]
        del self.buffer_docs[: need - 1]
        return {"tokens": tokens, "doc_ids": doc_ids - doc_ids[0]}

    def state_dict(self) -> dict:
        return {"docs": self.docs.state_dict(), "buffer": list(self.buffer),
                "buffer_docs": list(self.buffer_docs), "doc_counter": self.doc_counter}

    def load_state_dict(self, state: dict) -> None:
        self.docs.load_state_dict(state["docs"])
        self.buffer = list(state["buffer"])
        self.buffer_docs = list(state["buffer_docs"])
        self.doc_counter = state["doc_counter"]


def collate(windows: list[dict]) -> dict:
    """Windows of seq_len+1 to model inputs/targets of seq_len."""
    tokens = torch.stack([w["tokens"] for w in windows])
    doc_ids = torch.stack([w["doc_ids"] for w in windows])
    return {"input": tokens[:, :-1], "target": tokens[:, 1:], "doc_ids": doc_ids[:, :-1]}


def document_inputs(doc_ids: torch.Tensor) -> dict:
    """The forward kwargs that keep a packed window's documents apart: ``doc_ids`` for the
    same-document causal mask, and rotary positions that restart at each document, so each
    document is seen exactly as if it had been fed alone (the first one of a window starts
    mid-document: it restarts at 0, as it would after any truncation)."""
    doc_ids = doc_ids.contiguous()
    first = torch.searchsorted(doc_ids, doc_ids)  # rows are non-decreasing: a document's first index
    positions = torch.arange(doc_ids.shape[-1]).expand_as(doc_ids) - first
    return {"doc_ids": doc_ids, "position_ids": positions}


class Batches:
    """Groups a packed stream into micro-batches; its state is the stream's."""

    def __init__(self, stream: PackedStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return collate([next(self.stream) for _ in range(self.batch_size)])

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        """Start the (fresh) document stream at ``epoch``: for resuming with another world size."""
        self.stream.docs.epoch = epoch
