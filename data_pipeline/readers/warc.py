"""WARC / WET reader (gzip member per record, as Common Crawl ships them), via warcio.

Only ``response`` records with an HTML payload (and ``conversion`` records of WET files)
become documents; everything else is counted under a reason. A truncated or corrupt tail
ends the file with reason ``truncated``; the records before it are kept.
"""

from __future__ import annotations

from warcio.archiveiterator import ArchiveIterator

from data_pipeline.document import Document
from data_pipeline.readers.base import Reader, open_binary

HTML_TYPES = ("text/html", "application/xhtml+xml")


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
            if base:
                f.seek(base)
            it = ArchiveIterator(f, check_digests=False)
            try:
                for rec in it:
                    item = self._to_document(rec, path)
                    if item is None:
                        continue  # warcinfo/request/metadata records are not documents
                    # Read the rest of the record so the iterator knows where the next starts.
                    it.read_to_end(rec)
                    offset, length = it.member_info
                    yield base + offset + length, item
            except Exception as exc:  # truncated gzip, malformed headers, ...
                yield None, f"truncated:{type(exc).__name__}"

    def _to_document(self, rec, path):
        if rec.rec_type == "conversion":  # WET: text already extracted
            text = rec.content_stream().read().decode("utf-8", "replace")
            url = rec.rec_headers.get_header("WARC-Target-URI") or ""
            rid = rec.rec_headers.get_header("WARC-Record-ID") or url
            return Document(id=rid, text=text, url=url, source=self.source, metadata={"file": path})
        if rec.rec_type != "response":
            return None
        url = rec.rec_headers.get_header("WARC-Target-URI") or ""
        rid = rec.rec_headers.get_header("WARC-Record-ID") or url
        ctype = (rec.http_headers.get_header("Content-Type") or "") if rec.http_headers else ""
        if not ctype.lower().startswith(HTML_TYPES):
            return "non_html"
        payload = rec.content_stream().read(self.max_payload_bytes + 1)
        if len(payload) > self.max_payload_bytes:
            return "too_large"
        if not payload.strip():
            return "empty"
        return Document(id=rid, url=url, source=self.source, raw=payload,
                        metadata={"content_type": ctype, "file": path})
