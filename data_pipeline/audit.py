"""Why each document was dropped: one JSON line per decision, written by ``prepare_data``.

A line holds the URL, the record id, the input file and the reader's position of the
record in it (the byte offset of a WARC record, the line of a JSONL file), the step and its
reason, and, where the filter measured something, the statistic that decided and the
threshold it crossed (``stat`` / ``limit``: C4's sentence count, Gopher's and FineWeb's
ratios, the language score), and the facts a step noted: ``language`` and
``language_score`` for every language drop, ``kept_id`` and ``kept_url`` (the document
kept in its place) for a duplicate. Reason names are datatrove's where the rule is the
same; audits written before a rename are read under the new name (RENAMED_REASONS). Reader drops (records that are not pages,
payloads too large, unreadable JSON) are included, so every page record is accounted for:
it is either in the output or in the audit. WARC records that are not pages (warcinfo,
request, metadata, revisit) are counted by type in the reader's stats instead
(data_pipeline/readers/warc.py). With ``data.audit_text=true`` a line also
carries the removed text (as datatrove writes the removed documents of each filter).

``python launch/why_dropped.py <output dir> <url>`` answers "why was this URL dropped?".
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator

AUDIT_SUFFIX = ".audit.jsonl.gz"  # beside each output file of prepare_data
# Old kiln reason -> datatrove's name for the same rule, so old audits and .done stats read
# like new ones.
RENAMED_REASONS = {"gopher_below_avg_word_length": "gopher_below_avg_threshold",
                   "gopher_above_avg_word_length": "gopher_above_avg_threshold"}


def current_reason(reason: str) -> str:
    """A reason as this version names it (old audits may use a name since renamed)."""
    return RENAMED_REASONS.get(reason, reason)


class Audit:
    """Decisions of one input file's run, written to ``path`` atomically by ``close``."""

    def __init__(self, path: str, with_text: bool = False):
        self.path, self.with_text = path, with_text
        self.tmp = f"{path}.tmp{os.getpid()}"
        self._f = gzip.open(self.tmp, "wt", encoding="utf-8", compresslevel=5)
        self.lines = 0

    def dropped(self, step: str, reason: str, *, url: str = "", doc_id: str = "", file: str = "",
                offset=None, stat: float | None = None, limit: float | None = None, text: str | None = None,
                details: dict | None = None) -> None:
        row = {"url": url, "id": doc_id, "file": file, "offset": offset, "step": step, "reason": reason}
        if stat is not None:
            row["stat"], row["limit"] = round(float(stat), 6), limit
        if details:
            row.update(details)
        if self.with_text and text:
            row["text"] = text
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.lines += 1

    def close(self) -> None:
        self._f.close()
        os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


class RemovedBy:
    """An audit kept in memory: record id -> the step that dropped it (benchmarks, asset
    builders). ``watch(stream)`` attaches it to a DocumentStream's reader and steps."""

    def __init__(self):
        self.step: dict[str, str] = {}

    def watch(self, stream) -> RemovedBy:
        for part in (stream.reader, *stream.steps):
            part.audit = self
        return self

    def dropped(self, step: str, reason: str, *, doc_id: str = "", **_) -> None:
        if doc_id:
            self.step[doc_id] = step


def read_audits(paths: list[str]) -> Iterator[dict]:
    for path in paths:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                row["reason"] = current_reason(row.get("reason", ""))
                yield row


def audit_files(directory: str) -> list[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(AUDIT_SUFFIX))


def output_files(directory: str) -> list[str]:
    """The finished outputs of a prepare_data (or dedup_global) run in ``directory``, any
    format: ``*.jsonl.gz``, ``*.parquet`` or token shards ``*.bin``, each with its ``.done``
    marker (audits and token shards' id files are not outputs)."""
    from data_pipeline.token_shards import DOCS_META_SUFFIX

    out = []
    for name in sorted(os.listdir(directory)):
        if name.endswith((AUDIT_SUFFIX, DOCS_META_SUFFIX)) or not name.endswith((".jsonl.gz", ".parquet", ".bin")):
            continue
        path = os.path.join(directory, name)
        if os.path.exists(path + ".done"):
            out.append(path)
    return out


def kept_documents(directory: str) -> Iterator[dict]:
    """``{"id", "url"}`` of every document kept in ``directory``'s outputs, whatever their format."""
    for path in output_files(directory):
        if path.endswith(".bin"):
            from data_pipeline.token_shards import read_token_shard

            for row in read_token_shard(path):
                yield {"id": row["id"], "url": row["url"]}
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(path, columns=["id", "url"])
            yield from table.to_pylist()
        else:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                for line in f:
                    row = json.loads(line)
                    yield {"id": row.get("id", ""), "url": row.get("url", "")}
