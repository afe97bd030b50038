"""Readers: every format yields the same documents, resumes exactly, and shards disjointly."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from data_pipeline.config import SourceConfig
from data_pipeline.pipeline import build_reader
from data_pipeline.readers import HFReader, JsonlReader, ParquetReader, WarcReader

ROWS = [{"id": f"doc{i}", "text": f"Document number {i}. " * (1 + i % 3), "url": f"https://x.org/{i}"}
        for i in range(23)]


def write_jsonl(path, rows=ROWS):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    elif str(path).endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return str(path)


def write_warc(path, records):
    """records: (warc_type, url, content_type, body bytes)."""
    with open(path, "wb") as fh:
        w = WARCWriter(fh, gzip=True)
        for typ, url, ctype, body in records:
            if typ == "response":
                http = StatusAndHeaders("200 OK", [("Content-Type", ctype)], protocol="HTTP/1.1")
                rec = w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)
            else:
                rec = w.create_warc_record(url, typ, payload=io.BytesIO(body), warc_content_type=ctype)
            w.write_record(rec)
    return str(path)


def texts(reader) -> list[str]:
    return [d.text or d.raw.decode() for d in reader]


def resume_matches(make_reader, stop_after: int):
    """Read ``stop_after`` docs, save the state, continue in a fresh reader: same docs as one pass."""
    full = [d.id for d in make_reader()]
    r = make_reader()
    it = iter(r)
    first = [next(it).id for _ in range(stop_after)]
    state = r.state_dict()
    r2 = make_reader()
    r2.load_state_dict(state)
    assert first + [d.id for d in r2] == full
    return full


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_reads_plain_gzip_and_zstd_and_resumes(tmp_path, suffix):
    path = write_jsonl(tmp_path / f"a{suffix}")
    ids = resume_matches(lambda: JsonlReader(path), 7)
    assert ids == [r["id"] for r in ROWS]
    assert texts(JsonlReader(path)) == [r["text"] for r in ROWS]


def test_jsonl_uses_configured_keys_and_falls_back_to_line_ids(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"content": "hello there"}) + "\n\n" + json.dumps({"content": "again"}) + "\n")
    docs = list(JsonlReader(str(p), text_key="content"))
    assert [d.text for d in docs] == ["hello there", "again"]
    assert [d.id for d in docs] == ["b.jsonl:0", "b.jsonl:2"]


def test_parquet_reads_across_row_groups_and_resumes(tmp_path):
    path = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=5)
    assert pq.ParquetFile(path).num_row_groups == 5
    ids = resume_matches(lambda: ParquetReader(path, batch_size=3), 12)
    assert ids == [r["id"] for r in ROWS]


def test_hf_streaming_reader_on_a_local_file_resumes(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl")
    ids = resume_matches(lambda: HFReader(paths=path), 9)
    assert ids == [r["id"] for r in ROWS]
    shards = [[d.id for d in HFReader(paths=path, shard=s, num_shards=2)] for s in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(ids) and not set(shards[0]) & set(shards[1])


def test_wet_conversion_records_become_text_documents(tmp_path):
    path = write_warc(tmp_path / "a.warc.wet.gz", [
        ("warcinfo", "", "application/warc-fields", b"software: test\r\n"),
        ("conversion", "https://a.org/1", "text/plain", "First page text. Ünïcödé.".encode()),
        ("conversion", "https://a.org/2", "text/plain", b"Second page text."),
        ("conversion", "https://a.org/3", "text/plain", b"   "),
    ])
    r = build_reader(SourceConfig(paths=[path], format="wet"))
    docs = list(r)
    assert [(d.url, d.text) for d in docs] == [("https://a.org/1", "First page text. Ünïcödé."),
                                               ("https://a.org/2", "Second page text.")]
    assert docs[0].raw is None and r.stats.removed_by_reason == {"empty": 1, "record_type:warcinfo": 1}


def test_warc_skips_non_html_responses_and_counts_them(tmp_path):
    path = write_warc(tmp_path / "a.warc.gz", [
        ("response", "https://a.org/1", "text/html; charset=utf-8", b"<html><body><p>one</p></body></html>"),
        ("response", "https://a.org/img", "image/png", b"\x89PNG..."),
        ("response", "https://a.org/2", "application/xhtml+xml", b"<html><body><p>two</p></body></html>"),
        ("request", "https://a.org/1", "application/http; msgtype=request", b"GET / HTTP/1.1\r\n\r\n"),
    ])
    r = WarcReader(path)
    assert [d.url for d in r] == ["https://a.org/1", "https://a.org/2"]
    assert dict(r.stats.removed_by_reason) == {"non_html": 1, "record_type:request": 1}


def test_warc_counts_every_record_by_type_and_audits_only_pages(tmp_path):
    """Every record of the file is in the reader's ``seen``: documents, skipped responses
    (audited) and the records that are not pages, counted by WARC-Type without an audit line."""
    from data_pipeline.audit import RemovedBy

    path = write_warc(tmp_path / "a.warc.gz", [
        ("warcinfo", "", "application/warc-fields", b"software: test\r\n"),
        ("request", "https://a.org/1", "application/http; msgtype=request", b"GET /1 HTTP/1.1\r\n\r\n"),
        ("response", "https://a.org/1", "text/html", b"<html><body><p>one</p></body></html>"),
        ("metadata", "https://a.org/1", "application/warc-fields", b"fetchTimeMs: 12\r\n"),
        ("request", "https://a.org/2", "application/http; msgtype=request", b"GET /2 HTTP/1.1\r\n\r\n"),
        ("response", "https://a.org/2", "image/png", b"\x89PNG..."),
        ("revisit", "https://a.org/1", "application/http; msgtype=response", b""),
    ])
    r = WarcReader(path)

    class Lines(RemovedBy):
        def __init__(self):
            self.rows = []

        def dropped(self, step, reason, **kw):
            self.rows.append((reason, kw.get("url")))

    r.audit = audit = Lines()
    assert [d.url for d in r] == ["https://a.org/1"]
    assert r.stats.seen == 7 and r.stats.kept == 1
    assert dict(r.stats.removed_by_reason) == {"record_type:warcinfo": 1, "record_type:request": 2,
                                               "record_type:metadata": 1, "record_type:revisit": 1, "non_html": 1}
    assert audit.rows == [("non_html", "https://a.org/2")]


def test_warc_resumes_at_the_byte_offset_of_the_next_record(tmp_path):
    recs = [("response", f"https://a.org/{i}", "text/html", f"<p>page {i}</p>".encode()) for i in range(10)]
    path = write_warc(tmp_path / "a.warc.gz", recs)
    resume_matches(lambda: WarcReader(path), 4)
    r = WarcReader(path)
    it = iter(r)
    next(it)
    assert isinstance(r.state_dict()["position"], int) and r.state_dict()["position"] > 0


def test_record_sharding_of_one_file_is_disjoint_and_complete(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl")
    parts = [[d.id for d in JsonlReader(path, shard=s, num_shards=3)] for s in range(3)]
    flat = [i for p in parts for i in p]
    assert sorted(flat) == sorted(r["id"] for r in ROWS) and len(flat) == len(set(flat))


def test_file_sharding_gives_whole_files_to_shards(tmp_path):
    paths = [write_jsonl(tmp_path / f"f{i}.jsonl", ROWS[i * 5:(i + 1) * 5]) for i in range(4)]
    parts = [[d.id for d in JsonlReader(paths, shard=s, num_shards=2)] for s in range(2)]
    assert parts[0] == [r["id"] for r in ROWS[0:5] + ROWS[10:15]]
    assert parts[1] == [r["id"] for r in ROWS[5:10] + ROWS[15:20]]


def test_state_from_another_shard_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl")
    state = JsonlReader(path, shard=0, num_shards=2).state_dict()
    with pytest.raises(ValueError, match="shard"):
        JsonlReader(path, shard=1, num_shards=2).load_state_dict(state)


def test_a_skip_reason_pickles_with_its_offset_and_url():
    import pickle

    from data_pipeline.readers.base import Skip

    s = pickle.loads(pickle.dumps(Skip("too_large", 123, "https://e.example/")))
    assert s == "too_large" and s.offset == 123 and s.url == "https://e.example/"


def test_a_glob_or_directory_of_outputs_reads_the_documents_not_their_audits(tmp_path):
    """prepare_data and dedup_global write ``<output>.audit.jsonl.gz`` (its text audits carry a
    ``text`` field) and token shards' ``<name>.docs.jsonl.gz`` beside their outputs: the
    README's next step globs ``data/dedup/*.jsonl.gz``, which must not read them as documents.
    A side file named on its own is still read (the user asked for it), and a user's file
    that merely has such a name, with no output beside it, is data."""
    from data_pipeline.audit import AUDIT_SUFFIX
    from data_pipeline.readers.base import expand_paths
    from data_pipeline.token_shards import DOCS_META_SUFFIX

    out = tmp_path / "dedup"
    out.mkdir()
    doc = write_jsonl(out / "part0.jsonl.gz", ROWS[:3])
    audit = write_jsonl(out / f"part0.jsonl.gz{AUDIT_SUFFIX}", [{"id": "dropped", "text": "an audited page"}])
    write_jsonl(out / f"shard0{DOCS_META_SUFFIX}", [{"id": "doc0", "url": "https://x.org/0"}])
    (out / "shard0.bin").write_bytes(b"")  # the token shard the document list belongs to
    for spec in (str(out / "*.jsonl.gz"), str(out / "*.gz"), str(out / "**" / "*.gz")):
        files = expand_paths(spec)
        assert files == [doc], spec
        cfg = SourceConfig(name="x", format="jsonl", paths=[spec])
        assert [d.id for d in build_reader(cfg)] == ["doc0", "doc1", "doc2"]
    assert expand_paths(str(out)) == [doc, str(out / "shard0.bin")]
    assert expand_paths(audit) == [audit]
    # a user's data named like a side file, with no output beside it, is read
    data = tmp_path / "user"
    data.mkdir()
    wiki = write_jsonl(data / f"wiki{DOCS_META_SUFFIX}", ROWS[:2])
    notes = write_jsonl(data / f"notes{AUDIT_SUFFIX}", ROWS[2:3])
    assert expand_paths(str(data / "*.gz")) == sorted([wiki, notes])
    assert expand_paths(str(data)) == sorted([wiki, notes])
