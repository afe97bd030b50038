"""Inputs in object storage, for real: a moto S3 server on loopback (no internet), read
through fsspec/s3fs as s3:// URLs, a Common-Crawl-style warc.paths.gz manifest with
relative entries, and reads that fail mid-file and resume where they stopped."""

from __future__ import annotations

import gzip
import os
import socket

import pytest

from data_pipeline.readers.warc import WarcReader
from tests.conftest import SAMPLE_WARC

BUCKET = "commoncrawl-test"


def split_sample(directory, n=2) -> list[str]:
    """The sample WARC's response records dealt into ``n`` WARC files."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    paths = [os.path.join(directory, f"part{i}.warc.gz") for i in range(n)]
    files = [open(p, "wb") for p in paths]
    writers = [WARCWriter(f, gzip=True) for f in files]
    with open(SAMPLE_WARC, "rb") as f:
        for i, rec in enumerate(r for r in ArchiveIterator(f) if r.rec_type == "response"):
            writers[i % n].write_record(rec)
    for f in files:
        f.close()
    return paths


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        mp.setenv(k, v)
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    local = split_sample(tmp_path_factory.mktemp("crawl"))
    keys = [f"crawl-data/CC-TEST/segments/0/warc/{os.path.basename(p)}" for p in local]
    for path, key in zip(local, keys):
        with open(path, "rb") as f:
            client.put_object(Bucket=BUCKET, Key=key, Body=f.read())
    client.put_object(Bucket=BUCKET, Key="crawl-data/CC-TEST/warc.paths.gz", Body=gzip.compress("\n".join(keys).encode()))
    yield {"local": local, "manifest": f"s3://{BUCKET}/crawl-data/CC-TEST/warc.paths.gz",
           "urls": [f"s3://{BUCKET}/{k}" for k in keys]}
    mp.undo()
    server.stop()


def docs_of(paths) -> list[tuple[str, str, int]]:
    return [(d.id, d.url, len(d.raw)) for d in WarcReader(paths)]


def test_a_manifest_in_s3_lists_the_crawl_and_its_records_equal_the_local_files(s3):
    reader = WarcReader([s3["manifest"]])
    assert reader.files == s3["urls"]  # relative entries resolved against s3://bucket/, in manifest order
    got = docs_of([s3["manifest"]])
    assert got == docs_of(s3["local"]) and len(got) > 300


def test_a_read_that_fails_mid_file_resumes_at_the_byte_it_reached(s3, monkeypatch):
    """Every opened connection dies after 200 kB: each file is read in several connections,
    each resuming where the last stopped, and the records are exactly the local ones."""
    from data_pipeline.readers import remote

    real_open, opened = remote.RetryingFile._open, []

    class Flaky:
        def __init__(self, f):
            self.f, self.served = f, 0

        def read(self, n=-1):
            if self.served > 200_000:
                raise ConnectionResetError("connection reset by peer (injected)")
            data = self.f.read(n)
            self.served += len(data)
            return data

        def seek(self, *a):
            return self.f.seek(*a)

        def close(self):
            self.f.close()

    def flaky_open(self):
        real_open(self)
        opened.append(self.pos)
        self._f = Flaky(self._f)

    monkeypatch.setattr(remote.RetryingFile, "_open", flaky_open)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    assert docs_of(s3["urls"]) == docs_of(s3["local"])
    assert len(opened) > 4 and any(pos > 0 for pos in opened)  # reopened, at offsets past the start


def test_a_missing_object_fails_at_once_and_a_dead_server_fails_naming_file_and_offset(s3, monkeypatch):
    from data_pipeline.readers import remote

    with pytest.raises(FileNotFoundError):
        remote.open_binary(f"s3://{BUCKET}/no/such.warc.gz").read(10)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)

    def dead(self):
        raise ConnectionRefusedError("connection refused (injected)")

    monkeypatch.setattr(remote.RetryingFile, "_open", dead)
    f = remote.open_binary(s3["urls"][0], retries=2)
    with pytest.raises(OSError, match=r"part0.warc.gz: read at byte 0 failed 3 times"):
        f.read(10)


def test_prepare_data_reads_the_crawl_from_s3_by_its_manifest(s3, tmp_path):
    import importlib.util
    import json

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "launch", "prepare_data.py"))
    prepare_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_data)
    for name, inputs in (("remote", [s3["manifest"]]), ("local", s3["local"])):
        assert prepare_data.main(["--output-dir", str(tmp_path / name), "--input", *inputs,
                                  "--input-format", "warc"]) == 0
    counts = {name: sorted(json.load(open(p))["docs"] for p in (tmp_path / name).glob("*.done"))
              for name in ("remote", "local")}
    assert counts["remote"] == counts["local"] and sum(counts["local"]) > 50


def test_what_is_retried_and_what_is_not():
    """The exceptions fsspec lets through from aiohttp (https://) and botocore (s3://)."""
    import aiohttp
    import botocore.exceptions as bx

    from data_pipeline.readers.remote import transient

    def http(status):
        return aiohttp.ClientResponseError(None, (), status=status)

    assert transient(http(503)) and transient(http(429)) and not transient(http(404)) and not transient(http(403))
    assert transient(aiohttp.ServerDisconnectedError()) and transient(aiohttp.ClientPayloadError("cut"))
    assert transient(bx.EndpointConnectionError(endpoint_url="http://x")) and transient(bx.ReadTimeoutError(endpoint_url="x"))
    assert not transient(bx.ClientError({"Error": {"Code": "AccessDenied"}}, "GetObject"))
    assert transient(bx.ClientError({"Error": {"Code": "SlowDown"}}, "GetObject"))
    assert transient(ConnectionResetError()) and not transient(FileNotFoundError()) and not transient(ValueError())


class _RangeServer:
    """A plain HTTP server on loopback serving a directory with Range requests, as web
    hosts of crawls do (Common Crawl's https://data.commoncrawl.org). With ``cut`` set, the
    first response for each (file, start byte) stops after ``cut`` bytes and the connection
    closes: a real mid-transfer failure, seen by the client as a short body."""

    def __init__(self, root: str, cut: int | None = None):
        import re
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self
        self.root, self.cut, self.cuts, self.gets, self._seen = root, cut, [], [], set()

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.serve(head=True)

            def do_GET(self):
                self.serve(head=False)

            def serve(self, head: bool):
                path = os.path.join(outer.root, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    data = f.read()
                start, end = 0, len(data) - 1
                m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                if m:
                    start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:end + 1]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                outer.gets.append((self.path, start))
                if outer.cut is not None and len(body) > outer.cut and (self.path, start) not in outer._seen:
                    outer._seen.add((self.path, start))
                    outer.cuts.append((self.path, start))
                    self.wfile.write(body[:outer.cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_web_hosted_manifest_is_read_over_http_and_cut_transfers_resume(tmp_path, monkeypatch):
    """Common Crawl's own layout over plain HTTP on loopback: a warc.paths.gz whose entries
    are relative to the host. The first transfer of every range is cut short by the server;
    each read reconnects at the byte it reached (in the 12 MB file, past the first 5 MB
    block) and the records equal the local files."""
    from data_pipeline.readers import remote

    (tmp_path / "local").mkdir()
    local = split_sample(tmp_path / "local")
    with open(SAMPLE_WARC, "rb") as f:  # and one file larger than a read block (fsspec's 5 MB)
        (tmp_path / "local" / "big.warc.gz").write_bytes(f.read() * 3)
    local.append(str(tmp_path / "local" / "big.warc.gz"))
    web = tmp_path / "web"
    keys = [f"crawl-data/CC-TEST/segments/0/warc/{os.path.basename(p)}" for p in local]
    for path, key in zip(local, keys):
        os.makedirs(web / os.path.dirname(key), exist_ok=True)
        with open(path, "rb") as src, open(web / key, "wb") as dst:
            dst.write(src.read())
    (web / "crawl-data/CC-TEST/warc.paths.gz").write_bytes(gzip.compress("\n".join(keys).encode()))
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    server = _RangeServer(str(web), cut=150_000)
    try:
        manifest = f"{server.url}/crawl-data/CC-TEST/warc.paths.gz"
        reader = WarcReader([manifest])
        assert reader.files == [f"{server.url}/{k}" for k in keys]
        assert docs_of([manifest]) == docs_of(local)
        # Every file's first transfer was cut, and the big one's later blocks too ...
        assert {path for path, _ in server.cuts} == {f"/{k}" for k in keys}
        assert any(start > 0 for _, start in server.cuts)
        # ... and after each cut the file was asked for again, from no later than the cut
        # range and, when the cut was inside the file, not from its start: a resume, not a
        # restart (the big file is requested from byte 0 only twice: the cut and the retry).
        for path, start in server.cuts:
            later = server.gets[server.gets.index((path, start)) + 1:]
            assert any(p == path and s <= start and (s > 0 or start == 0) for p, s in later), (path, start)
        assert server.gets.count((f"/{keys[-1]}", 0)) == 2
    finally:
        server.close()
