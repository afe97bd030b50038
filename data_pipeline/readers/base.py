"""Common reader machinery: path expansion, rank/worker sharding and resumable position.

Sharding: when there are at least as many files as shards, each shard owns whole files
(file i belongs to shard i % n). Otherwise every shard reads every file and keeps record i
when i % n == shard, so a single bundled file still splits disjointly across ranks and
DataLoader workers. Either way no record is read by two shards and none is lost.

Position: ``state_dict`` holds the file index and the byte offset / record index where
reading continues, so a resumed stream only re-opens the current file and seeks.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import fsspec

from data_pipeline.document import Document
from data_pipeline.step import StepStats


def expand_paths(paths) -> list[str]:
    """Globs, fsspec URLs and manifests (``*.paths[.gz]``, e.g. Common Crawl's
    ``warc.paths.gz``: data_pipeline/readers/remote.py) to a de-duplicated list of files,
    sorted per pattern (a manifest keeps its order); error if none. A glob or a directory
    never yields the files kiln writes beside an output -- ``X.audit.jsonl.gz`` beside ``X``,
    ``Y.docs.jsonl.gz`` beside the token shard ``Y.bin`` -- so ``data/dedup/*.jsonl.gz`` means
    the documents, not their audits; a file with such a name and no such companion is a
    user's data and is kept."""
    from data_pipeline.audit import AUDIT_SUFFIX
    from data_pipeline.readers.remote import is_manifest, manifest_entries
    from data_pipeline.token_shards import DOCS_META_SUFFIX

    def documents(found, exists=os.path.exists):
        def side_file(f: str) -> bool:
            if f.endswith(AUDIT_SUFFIX):
                return exists(f[: -len(AUDIT_SUFFIX)])
            return f.endswith(DOCS_META_SUFFIX) and exists(f[: -len(DOCS_META_SUFFIX)] + ".bin")

        return sorted(f for f in found if not side_file(f))

    if isinstance(paths, str):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.path.expanduser(str(p))
        if is_manifest(p):
            out.extend(manifest_entries(p))
        elif "://" in p:
            _fs, _, found = fsspec.get_fs_token_paths(p)
            proto = p.split("://", 1)[0]
            out.extend(documents((f if "://" in f else f"{proto}://{f}" for f in found), _fs.exists))
        elif any(ch in p for ch in "*?["):
            out.extend(documents(glob.glob(p, recursive=True)))
        elif os.path.isdir(p):
            out.extend(documents(os.path.join(p, f) for f in os.listdir(p) if not f.startswith(".")))
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"no input file matches {p!r}")
    seen, files = set(), []
    for f in out:
        if f not in seen:
            seen.add(f)
            files.append(f)
    if not files:
        raise FileNotFoundError(f"no input file matches {paths!r}")
    return files


class Skip(str):
    """A reason a reader skipped a record, with where the record starts (and its URL when
    known), for the audit; a plain string reason means "after the previous record".
    ``audited=False`` counts the record in the reader's stats without an audit line: a
    record that is not a page at all (a WARC request, metadata or warcinfo record), whose
    URL would otherwise read as "dropped" beside the page kept from its response record."""

    def __new__(cls, reason: str, offset: int, url: str = "", audited: bool = True):
        self = super().__new__(cls, reason)
        self.offset, self.url, self.audited = offset, url, audited
        return self

    def __reduce__(self):
        return (Skip, (str(self), self.offset, self.url, self.audited))


def _offset(position):
    """The reader's position of a record as JSON: an int (WARC byte offset, JSONL line), else
    its text; None (the start of the file) is 0."""
    if position is None:
        return 0
    return position if isinstance(position, int) else str(position)


class Reader:
    """Base reader. Subclasses implement ``_records(path, start)`` yielding
    ``(position_after_record, Document | skip_reason)`` for one file from ``start``."""

    name = "reader"
    audit = None  # a data_pipeline.audit.Audit: records skipped here are written there

    def __init__(self, paths, source: str = "web", shard: int = 0, num_shards: int = 1):
        self.files = expand_paths(paths)
        self.source = source
        self.stats = StepStats()
        self.set_shard(shard, num_shards)

    def set_shard(self, shard: int, num_shards: int) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} out of range for {num_shards} shards")
        self.shard, self.num_shards = shard, num_shards
        self.by_file = len(self.files) >= num_shards
        self.reset()

    def reset(self) -> None:
        self.file_idx = 0
        self.position: object | None = None  # reader-specific resume point inside file
        self.record_idx = 0  # global count of records passed, for record-level sharding

    def my_files(self) -> list[int]:
        if self.by_file:
            return [i for i in range(len(self.files)) if i % self.num_shards == self.shard]
        return list(range(len(self.files)))

    def __iter__(self) -> Iterator[Document]:
        files = self.my_files()
        while self.file_idx < len(files):
            path = self.files[files[self.file_idx]]
            for pos, item in self._records(path, self.position):
                start, self.position = self.position, pos
                mine = self.by_file or self.record_idx % self.num_shards == self.shard
                self.record_idx += 1
                if not mine:
                    continue
                self.stats.seen += 1
                if isinstance(item, Document):
                    size = len(item.raw or item.text.encode("utf-8", "replace"))
                    self.stats.kept += 1
                    self.stats.bytes_kept += size
                    self.stats.bytes_seen += size
                    if self.audit is not None:  # where the record came from, for the audit lines
                        item.metadata.setdefault("file", path)
                        item.metadata.setdefault("offset", _offset(start))
                    yield item
                else:
                    reason = str(item)
                    self.stats.removed += 1
                    self.stats.removed_by_reason[reason] += 1
                    if self.audit is not None and getattr(item, "audited", True):
                        where = item.offset if isinstance(item, Skip) else _offset(start)
                        self.audit.dropped(self.name, reason, file=path, offset=where, url=getattr(item, "url", ""))
            self.file_idx += 1
            self.position = None

    def _records(self, path: str, start):
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"file_idx": self.file_idx, "position": self.position, "record_idx": self.record_idx,
                "files": self.files, "shard": self.shard, "num_shards": self.num_shards}

    def load_state_dict(self, state: dict) -> None:
        if state["files"] != self.files:
            raise ValueError("stream state was saved for other input files; refusing to resume "
                             f"({len(state['files'])} files then, {len(self.files)} now)")
        if (state["shard"], state["num_shards"]) != (self.shard, self.num_shards):
            raise ValueError(f"stream state belongs to shard {state['shard']}/{state['num_shards']}, "
                             f"this reader is {self.shard}/{self.num_shards}")
        self.file_idx, self.position, self.record_idx = state["file_idx"], state["position"], state["record_idx"]


def open_binary(path: str):
    """Local files directly; remote objects with retries that resume (readers/remote.py)."""
    from data_pipeline.readers.remote import open_binary as open_any

    return open_any(path)
