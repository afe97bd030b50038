"""Cost of checkpoint integrity: seconds per GB to hash a file (the manifest at save, and
``checkpoint.verify=full`` at load), against the alternatives, on this machine.

    python benchmarks/bench_checkpoint.py [--gb 1.0]

The file is read from the page cache after a first pass, so the numbers are the hashing
cost; a cold read adds the disk's own throughput.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import checkpoint as ckpt  # noqa: E402


def _time(fn, path: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(path)
        best = min(best, time.perf_counter() - t0)
    return best


def _stream(h_update, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h_update(chunk)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    args = ap.parse_args()
    size = int(args.gb * (1 << 30))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "blob")
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, 64 << 20)
                f.write(os.urandom(n))
                left -= n
        _stream(lambda b: None, path)  # warm the page cache
        gb = size / (1 << 30)
        rows = [
            ("read only", _time(lambda p: _stream(lambda b: None, p), path)),
            (f"kiln {ckpt.HASH} (file_digest)", _time(ckpt.file_digest, path)),
            ("blake2b", _time(lambda p: _stream(hashlib.blake2b().update, p), path)),
            ("sha256", _time(lambda p: _stream(hashlib.sha256().update, p), path)),
            ("crc32 (zlib)", _time(lambda p: _stream(lambda b: zlib.crc32(b), p), path)),
        ]
    print(f"{gb:.2f} GB file, best of 3, one core")
    for name, secs in rows:
        print(f"  {name:28s} {secs / gb:7.3f} s/GB  ({gb / secs:6.2f} GB/s)")


if __name__ == "__main__":
    main()
