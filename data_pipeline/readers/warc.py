"""WARC / WET reader (gzip member per record, as Common Crawl ships them), via warcio.

Only ``response`` records with an HTML payload (and ``conversion`` records of WET files)
become documents; everything else is counted under a reason, so the reader's ``seen`` is
every record of the file. Records of the other types (``warcinfo``, ``request``,
``metadata``, ``revisit``, ``resource``...) are counted as ``record_type:<type>``
(RECORD_TYPE_REASON) in the reader's stats and the report, without an audit line: they
are not pages, and a Common Crawl WARC has a request and a metadata record for each page
whose response may well be kept. Damaged input never ends the
run: a record whose gzip member is corrupt is skipped (``corrupt_record``) and reading
resumes at the next gzip member; a file that ends inside a record ends with ``truncated``,
keeping the records before it. Payloads over ``max_payload_bytes`` are skipped without
being held in memory (``too_large``).
"""

from __future__ import annotations

import zlib

from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.statusandheaders import StatusAndHeadersParserException

from data_pipeline.document import Document
from data_pipeline.readers.base import Reader, Skip, open_binary

HTML_TYPES = ("text/html", "application/xhtml+xml")
GZIP_MAGIC = b"\x1f\x8b\x08"
# What a damaged record can raise inside warcio / zlib / gzip.
RECORD_TYPE_REASON = "record_type:"  # + the WARC-Type of a record that is not a page
READ_ERRORS = (ArchiveLoadFailed, StatusAndHeadersParserException, zlib.error, EOFError, OSError,
               ValueError, UnicodeDecodeError)


def _next_member(f, start: int, chunk: int = 1 << 20):
    """Offset of the next gzip member header at or after ``start``, or None."""
    f.seek(start)
    pos, tail = start, b""
    while True:
        block = f.read(chunk)
        if not block:
            return None
        data = tail + block
        i = data.find(GZIP_MAGIC)
        if i >= 0:
            return pos - len(tail) + i
        tail = data[-2:]
        pos += len(block)


class WarcReader(Reader):
    name = "warc_reader"

    def __init__(self, paths, source: str = "web", shard: int = 0, num_shards: int = 1,
                 max_payload_bytes: int = 10_000_000):
        self.max_payload_bytes = max_payload_bytes
        super().__init__(paths, source, shard, num_shards)

    def _records(self, path: str, start):
        """Yield (offset_of_next_record, doc_or_reason). Resumes by seeking to ``start``."""
        with open_binary(path) as f:
            base = start or 0
            while base is not None:
                f.seek(base)
                it = ArchiveIterator(f, check_digests=False)
                next_off = base
                try:
                    for rec in it:
                        item = self._to_document(rec, path)
                        it.read_to_end(rec)
                        offset, length = it.member_info
                        next_off = base + offset + length
                        if item is not None and getattr(rec.raw_stream, "limit", 0) > 0:
                            item = "truncated"  # the stream ended before Content-Length bytes
                        if isinstance(item, str):
                            item = Skip(item, base + offset, rec.rec_headers.get_header("WARC-Target-URI") or "",
                                        audited=not item.startswith(RECORD_TYPE_REASON))
                        else:
                            item.metadata["offset"] = base + offset  # where the record starts in the file
                        yield next_off, item
                    f.seek(0, 2)
                    if f.tell() <= next_off:
                        return
                    # warcio stopped early without an error: bytes are left after the last
                    # complete record (a member cut inside its header, or trailing junk).
                    exc = EOFError("unparsed bytes after the last record")
                    raise exc
                except READ_ERRORS as exc:
                    resync = _next_member(f, next_off + 1)
                    if resync is None:
                        yield None, "truncated"
                        return
                    yield resync, f"corrupt_record:{type(exc).__name__}"
                    base = resync

    def _to_document(self, rec, path):
        rtype = rec.rec_type
        if rtype is None:
            return "malformed_warc_header"
        url = rec.rec_headers.get_header("WARC-Target-URI") or ""
        rid = rec.rec_headers.get_header("WARC-Record-ID") or url
        if rtype == "conversion":  # WET: text already extracted
            raw = rec.content_stream().read(self.max_payload_bytes + 1)
            if len(raw) > self.max_payload_bytes:
                return "too_large"
            if not raw.strip():
                return "empty"
            return Document(id=rid, text=raw.decode("utf-8", "replace"), url=url, source=self.source,
                            metadata={"file": path})
        if rtype != "response":
            return RECORD_TYPE_REASON + rtype
        http = rec.http_headers
        status = http.get_statuscode() if http else None
        if not status or not status.isdigit():
            return "malformed_http_header"
        if not status.startswith("2"):
            return "http_status"
        ctype = http.get_header("Content-Type") or ""
        if not ctype.lower().startswith(HTML_TYPES):
            return "non_html"
        payload = rec.content_stream().read(self.max_payload_bytes + 1)
        if len(payload) > self.max_payload_bytes:
            return "too_large"
        if not payload.strip():
            return "empty"
        return Document(id=rid, url=url, source=self.source, raw=payload,
                        metadata={"content_type": ctype, "file": path})
