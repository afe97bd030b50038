"""JSON-lines reader for plain, gzip and zstd files (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``).

This is also how the trainer reads shards written by ``launch/prepare_data.py``. The
position is the number of lines consumed plus, for plain files, the byte offset, so a
resume seeks straight there; compressed files are re-read and the consumed lines skipped
(they cannot be seeked), which costs one decompression pass over the skipped prefix.
Bad lines (invalid UTF-8 or JSON, no text, NUL-laden, over ``max_doc_bytes``) are skipped
with a reason; a compressed file that ends early keeps the lines before the damage.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zlib

import zstandard

from data_pipeline.document import Document
from data_pipeline.readers.base import Reader, open_binary


def open_lines(path: str):
    """A binary file object over the decompressed content (by file extension)."""
    raw = open_binary(path)
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


class JsonlReader(Reader):
    name = "jsonl_reader"

    def __init__(self, paths, source: str = "jsonl", shard: int = 0, num_shards: int = 1,
                 text_key: str = "text", id_key: str = "id", url_key: str = "url",
                 max_doc_bytes: int = 10_000_000):
        self.text_key, self.id_key, self.url_key = text_key, id_key, url_key
        self.max_doc_bytes = max_doc_bytes
        super().__init__(paths, source, shard, num_shards)

    def _records(self, path: str, start):
        line_no, offset = start or (0, 0)
        plain = not path.endswith((".gz", ".zst", ".zstd"))
        with open_lines(path) as f:
            try:
                if plain:
                    f.seek(offset)
                else:
                    for _ in range(line_no):
                        f.readline()
                while True:
                    line = f.readline(self.max_doc_bytes + 1)
                    if not line:
                        return
                    consumed = len(line)
                    if len(line) > self.max_doc_bytes and not line.endswith(b"\n"):
                        chunk = line
                        while chunk and not chunk.endswith(b"\n"):  # skip the rest of a giant line
                            chunk = f.readline(1 << 20)
                            consumed += len(chunk)
                        item = "too_large"
                    else:
                        item = self._parse(line, path, line_no)
                    offset += consumed
                    line_no += 1
                    if item is not None:
                        yield (line_no, offset), item
            except (EOFError, zlib.error, zstandard.ZstdError, OSError):
                yield None, "truncated"

    def _parse(self, line: bytes, path: str, line_no: int):
        if not line.strip():
            return None  # blank line: not a record
        try:
            rec = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return "invalid_utf8"
        except ValueError:
            return "bad_json"
        if not isinstance(rec, dict):
            return "bad_json"
        return record_to_document(rec, self.text_key, self.id_key, self.url_key, self.source,
                                  f"{os.path.basename(path)}:{line_no}", path)


def record_to_document(rec: dict, text_key: str, id_key: str, url_key: str, source: str,
                       fallback_id: str, path: str):
    """A row of any tabular source to a Document, or a skip reason."""
    text = rec.get(text_key)
    if not isinstance(text, str):
        return "no_text"
    if not text.strip():
        return "empty"
    if "\x00" in text:
        return "nul_bytes"
    meta = rec.get("metadata")
    if isinstance(meta, str):  # parquet shards from prepare_data keep metadata as a JSON string
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = {}
    meta = meta if isinstance(meta, dict) else {}
    meta = {**meta, "file": path}
    rid = rec.get(id_key)
    url = rec.get(url_key)
    return Document(id=str(rid) if rid is not None else fallback_id, text=text,
                    url=url if isinstance(url, str) else "", source=source, metadata=meta)
