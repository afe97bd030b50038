"""Inputs that live in object storage or on the web: manifests, retries, range reads.

Any fsspec URL works as an input path (``s3://``, ``gs://``, ``https://``; the protocol's
package must be installed: ``pip install -e ".[s3]"`` for S3). Two things make a crawl
read from far away survive:

- **Manifests.** A path ending in ``.paths`` or ``.paths.gz`` (Common Crawl's
  ``warc.paths.gz``, ``wet.paths.gz``) lists one input per line. Relative entries are
  resolved against the manifest's root: ``scheme://host/`` for a URL (so
  ``https://data.commoncrawl.org/crawl-data/CC-MAIN-2024-10/warc.paths.gz`` or
  ``s3://commoncrawl/crawl-data/.../warc.paths.gz`` both work as given), the manifest's
  directory for a local file.
- **Retries that resume.** A remote file is read through ``RetryingFile``: a failed read
  (connection reset, timeout, throttling, a 5xx: ``transient``) closes the connection, waits
  (0.5 s, doubling), reopens the object and seeks back to the byte it had reached, so a
  multi-GB WARC is not read again from the start and no record is lost or repeated. After
  ``retries`` failures in a row the error names the file and the byte offset.
"""

from __future__ import annotations

import gzip
import io
import os
import time
from urllib.parse import urlsplit

import fsspec

MANIFEST_SUFFIXES = (".paths", ".paths.gz")
# Not worth retrying: the object is not there or not ours to read.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def transient(e: BaseException) -> bool:
    """Whether a failed read may succeed if tried again: connection resets, timeouts, cut-off
    bodies, throttling (429) and server errors (5xx) -- as OSErrors, or as the aiohttp
    (https://) and botocore (s3://) exceptions fsspec lets through; not a missing object or
    a refused permission."""
    if isinstance(e, PERMANENT):
        return False
    status = getattr(e, "status", None)  # aiohttp.ClientResponseError
    response = getattr(e, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore.exceptions.ClientError
        if response["Error"].get("Code") in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable",
                                             "Throttling", "ThrottlingException"):
            return True
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 400
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(e, (OSError, TimeoutError, ConnectionError)):
        return True
    kinds = {c.__module__.split(".")[0] for c in type(e).__mro__}
    return bool(kinds & {"aiohttp", "botocore", "urllib3", "requests"})


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def is_manifest(path: str) -> bool:
    return path.endswith(MANIFEST_SUFFIXES)


def manifest_entries(path: str) -> list[str]:
    """The inputs a manifest lists, relative entries resolved against its root."""
    with open_binary(path) as raw:
        data = gzip.decompress(raw.read()) if path.endswith(".gz") else raw.read()
    if is_remote(path):
        parts = urlsplit(path)
        root = f"{parts.scheme}://{parts.netloc}/"
    else:
        root = os.path.dirname(os.path.abspath(path)) + os.sep
    entries = []
    for line in data.decode("utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(line if "://" in line or os.path.isabs(line) else root + line)
    if not entries:
        raise FileNotFoundError(f"manifest {path} lists no input")
    return entries


class RetryingFile(io.RawIOBase):
    """A seekable binary view of a remote object that reopens and resumes on read errors."""

    def __init__(self, path: str, retries: int = 5, backoff: float = 0.5):
        self.path, self.retries, self.backoff = path, retries, backoff
        self.pos = 0
        self.reopens = 0  # how many times a failed read was resumed (tests, logs)
        self._f = None

    def _open(self):
        self._f = fsspec.open(self.path, "rb").open()
        if self.pos:
            self._f.seek(self.pos)

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
        self._f = None

    def _attempt(self, what, fn):
        for attempt in range(self.retries + 1):
            try:
                if self._f is None:
                    self._open()
                return fn(self._f)
            except Exception as e:
                if not transient(e):
                    raise
                self._drop()
                if attempt == self.retries:
                    raise OSError(f"{self.path}: {what} at byte {self.pos} failed {self.retries + 1} times: "
                                  f"{type(e).__name__}: {e}") from e
                time.sleep(self.backoff * 2**attempt)
                self.reopens += 1

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._attempt("read", lambda f: f.read(len(b)))
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
            if self._f is not None:
                self._attempt("seek", lambda f: f.seek(offset))
            return self.pos
        self.pos = self._attempt("seek", lambda f: f.seek(offset, whence))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self._drop()
        super().close()


def open_binary(path: str, retries: int = 5):
    """A buffered binary file: local files directly, remote objects through RetryingFile."""
    if is_remote(path):
        return io.BufferedReader(RetryingFile(path, retries), buffer_size=1 << 20)
    return fsspec.open(path, "rb").open()
