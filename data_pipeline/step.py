"""Pipeline steps: small transformations over a stream of documents, each keeping stats.

A step takes an iterator of documents and yields documents. Filters decide keep/drop per
document and give a reason when they drop, so the run report can say what was removed
and why. Every step can be stateful (dedup keeps its index); ``state_dict`` lets the
trainer checkpoint it together with the reader position.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.document import Document


@dataclass
class StepStats:
    seen: int = 0
    kept: int = 0
    removed: int = 0
    bytes_seen: int = 0
    bytes_kept: int = 0
    removed_by_reason: Counter = field(default_factory=Counter)
    bytes_removed_by_reason: Counter = field(default_factory=Counter)
    examples_by_reason: dict = field(default_factory=lambda: defaultdict(list))
    kept_by_language: Counter = field(default_factory=Counter)  # "und" until language id has run
    removed_by_language: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "kept": self.kept,
            "removed": self.removed,
            "bytes_seen": self.bytes_seen,
            "bytes_kept": self.bytes_kept,
            "removed_by_reason": dict(self.removed_by_reason),
            "bytes_removed_by_reason": dict(self.bytes_removed_by_reason),
            "kept_by_language": dict(self.kept_by_language),
            "removed_by_language": dict(self.removed_by_language),
        }

    def merge(self, other: dict) -> None:
        """Add the counts of another ``as_dict()`` (e.g. from another prepare_data task;
        reasons renamed since it was written count under their new name)."""
        from data_pipeline.audit import current_reason

        for k in ("seen", "kept", "removed", "bytes_seen", "bytes_kept"):
            setattr(self, k, getattr(self, k) + other.get(k, 0))
        for k in ("removed_by_reason", "bytes_removed_by_reason"):
            counts = getattr(self, k)
            for reason, n in other.get(k, {}).items():
                counts[current_reason(reason)] += n
        for k in ("kept_by_language", "removed_by_language"):
            getattr(self, k).update(other.get(k, {}))


def doc_bytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8", "replace")) if doc.text else len(doc.raw or b"")


class PipelineStep:
    """Base class. Subclasses override ``process`` (one doc in, zero or one out)."""

    name: str = "step"
    max_examples_per_reason = 3
    # Stateful steps (dedup) set this. In a background data worker their index is mirrored in
    # the training process: the worker records each change of the index in ``journal`` as
    # (method name, arguments), the mirror replays the changes of the windows the trainer
    # consumed, and the worker's own state_dict() returns ``{"mirrored": mirror_id}``
    # instead of packing the index (train/data_workers.py).
    stateful = False
    journal: list | None = None
    mirror_id: int | None = None
    audit = None  # a data_pipeline.audit.Audit: every drop is written there with its reason

    def __init__(self):
        self.stats = StepStats()
        self.decision: tuple[float, float] | None = None  # (statistic, threshold) of the last drop
        self.details: dict | None = None  # other facts of the last drop for the audit (noted)

    def decided(self, reason: str, stat: float, limit: float) -> str:
        """Return ``reason``, remembering the statistic and the threshold it crossed (audit)."""
        self.decision = (stat, limit)
        return reason

    def noted(self, reason: str, **details) -> str:
        """Return ``reason``, remembering facts about the drop for its audit line (the
        language and its score; the document a duplicate duplicates)."""
        self.details = details
        return reason

    def _record(self, method: str, *args) -> None:
        if self.journal is not None:
            self.journal.append((method, args))

    def process(self, doc: Document) -> Document | str | None:
        """Return the (possibly changed) document to keep it, or a reason string to drop it."""
        return doc

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            out = self.run_one(doc)
            if out is not None:
                yield out

    def run_one(self, doc: Document) -> Document | None:
        s = self.stats
        size = doc_bytes(doc)
        s.seen += 1
        s.bytes_seen += size
        self.decision = self.details = None
        out = self.process(doc)
        lang = doc.metadata.get("language", "und")
        if isinstance(out, Document):
            s.kept += 1
            s.bytes_kept += doc_bytes(out)
            s.kept_by_language[lang] += 1
            return out
        reason = out or "removed"
        s.removed += 1
        s.removed_by_language[lang] += 1
        s.removed_by_reason[reason] += 1
        s.bytes_removed_by_reason[reason] += size
        examples = s.examples_by_reason[reason]
        if len(examples) < self.max_examples_per_reason:
            examples.append({"id": doc.id, "url": doc.url, "text": (doc.text or "")[:500]})
        if self.audit is not None:
            stat, limit = self.decision or (None, None)
            self.audit.dropped(self.name, reason, url=doc.url, doc_id=doc.id, file=doc.metadata.get("file", ""),
                               offset=doc.metadata.get("offset"), stat=stat, limit=limit, text=doc.text,
                               details=self.details)
        return None

    def new_epoch(self) -> None:
        """Called when the stream starts another pass over its input (dedup forgets)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Filter(PipelineStep):
    """A step that only keeps or drops. Subclasses implement ``reject`` -> reason or None."""

    def reject(self, doc: Document) -> str | None:
        raise NotImplementedError

    def process(self, doc: Document):
        reason = self.reject(doc)
        return doc if reason is None else reason
