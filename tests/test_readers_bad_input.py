"""Damaged input is skipped and counted with a reason; it never ends the run."""

from __future__ import annotations

import gzip
import io
import json
import os

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from data_pipeline.document import Document
from data_pipeline.extract import HtmlExtractor
from data_pipeline.filters import LanguageFilter
from data_pipeline.readers import JsonlReader, WarcReader


def response(url: str, body: bytes, ctype: str = "text/html; charset=utf-8") -> bytes:
    """One gzip member holding one WARC response record."""
    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=True)
    http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
    w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))
    return buf.getvalue()


def raw_record(block: bytes, url: str = "https://bad.org/", warc_type: str = "response") -> bytes:
    head = (f"WARC/1.1\r\nWARC-Type: {warc_type}\r\nWARC-Target-URI: {url}\r\n"
            f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000001>\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(block)}\r\n\r\n").encode()
    return gzip.compress(head + block + b"\r\n\r\n")


def page(i: int) -> bytes:
    return response(f"https://ok.org/{i}", f"<html><body><p>good page {i}</p></body></html>".encode())


def read(tmp_path, data: bytes, **kw):
    p = tmp_path / "x.warc.gz"
    p.write_bytes(data)
    r = WarcReader(str(p), **kw)
    return [d.url for d in r], dict(r.stats.removed_by_reason)


def test_truncated_last_member_keeps_the_records_before_it(tmp_path):
    big = response("https://ok.org/big", b"<html><body>" + os.urandom(20000).hex().encode() + b"</body></html>")
    urls, reasons = read(tmp_path, page(0) + page(1) + big[: len(big) // 2])
    assert urls == ["https://ok.org/0", "https://ok.org/1"]
    assert reasons == {"truncated": 1}


def test_member_cut_inside_its_header_is_counted_as_truncated(tmp_path):
    urls, reasons = read(tmp_path, page(0) + page(1)[:15])
    assert urls == ["https://ok.org/0"] and reasons == {"truncated": 1}


def test_corrupt_member_in_the_middle_is_skipped_and_reading_resumes(tmp_path):
    bad = bytearray(page(9))
    bad[30:60] = b"\xff" * 30  # damage the deflate stream
    urls, reasons = read(tmp_path, page(0) + bytes(bad) + page(1) + page(2))
    assert urls == ["https://ok.org/0", "https://ok.org/1", "https://ok.org/2"]
    assert sum(reasons.values()) == 1 and next(iter(reasons)).startswith("corrupt_record")


def test_malformed_warc_and_http_headers_are_skipped(tmp_path):
    bad_warc = gzip.compress(b"WARC/1.1\r\nthis is not a header\r\nContent-Length: 4\r\n\r\nxxxx\r\n\r\n")
    bad_http = raw_record(b"NOT-HTTP garbage\r\nno headers\r\n\r\n<html>hidden</html>")
    urls, reasons = read(tmp_path, page(0) + bad_warc + page(1) + bad_http + page(2))
    assert urls == ["https://ok.org/0", "https://ok.org/1", "https://ok.org/2"]
    assert reasons == {"malformed_warc_header": 1, "malformed_http_header": 1}


def test_empty_binary_and_giant_payloads_are_skipped(tmp_path):
    giant = response("https://ok.org/giant", b"<html><body>" + b"a" * 50_000_000 + b"</body></html>")
    data = (page(0) + response("https://ok.org/empty", b"") + response("https://ok.org/png", b"\x89PNG\x00", "image/png")
            + giant + page(1))
    urls, reasons = read(tmp_path, data)
    assert urls == ["https://ok.org/0", "https://ok.org/1"]
    assert reasons == {"empty": 1, "non_html": 1, "too_large": 1}


def extract(body: bytes, ctype: str = "text/html; charset=utf-8"):
    return HtmlExtractor().process(Document(id="x", raw=body, metadata={"content_type": ctype}))


def test_binary_payload_labelled_html_is_dropped_by_the_extractor():
    assert extract(bytes(range(256)) * 20) == "binary"
    assert extract(b"<html><body><p>text \x00 with a NUL</p></body></html>") == "binary"


def test_invalid_utf8_is_decoded_or_dropped_never_raised():
    out = extract(b"<html><body><p>caf\xe9 cr\xe8me br\xfbl\xe9e, " + b"plain words " * 50 + b"</p></body></html>")
    assert isinstance(out, Document) and "caf" in out.text and "\ufffd" not in out.text
    # Pure garbage decodes as mojibake in some legacy codec; language id then drops it.
    garbage = extract(b"<html><body><p>" + b"\xc3\x28\xa0\xa1" * 500 + b"</p></body></html>")
    if isinstance(garbage, Document):
        garbage = LanguageFilter(languages=["en"]).process(garbage)
    assert isinstance(garbage, str)


def test_text_documents_with_control_characters_are_dropped():
    assert HtmlExtractor().process(Document(id="x", text="\x01\x02\x03" * 100 + "text")) == "binary"
    d = HtmlExtractor().process(Document(id="x", text="ok text with one NUL\x00 in " + "words " * 50))
    assert isinstance(d, Document) and "\x00" not in d.text


def test_jsonl_bad_lines_are_skipped_with_reasons(tmp_path):
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": "good one"}).encode(),
             b'{"text": "caf\xe9"}',  # invalid UTF-8
             b'{"text": broken json',
             b"[1, 2, 3]",
             json.dumps({"title": "no text field"}).encode(),
             json.dumps({"text": ""}).encode(),
             json.dumps({"text": "nul \u0000 inside"}).encode(),
             json.dumps({"text": "x" * 3000}).encode(),  # over max_doc_bytes below
             json.dumps({"text": "good two"}).encode()]
    p.write_bytes(b"\n".join(lines) + b"\n")
    r = JsonlReader(str(p), max_doc_bytes=2000)
    assert [d.text for d in r] == ["good one", "good two"]
    assert dict(r.stats.removed_by_reason) == {"invalid_utf8": 1, "bad_json": 2, "no_text": 1, "empty": 1,
                                               "nul_bytes": 1, "too_large": 1}


def test_truncated_gzip_jsonl_keeps_the_lines_before_the_cut(tmp_path):
    data = gzip.compress(b"".join(json.dumps({"text": f"line {i} " + "pad " * 200}).encode() + b"\n"
                                  for i in range(50)))
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(data[: len(data) // 2])
    r = JsonlReader(str(p))
    got = [d.text.split()[1] for d in r]
    assert 0 < len(got) < 50 and got == [str(i) for i in range(len(got))]
    assert dict(r.stats.removed_by_reason) == {"truncated": 1}
