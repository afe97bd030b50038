"""Tokens per second delivered to the trainer, per rank, by each input path.

    python benchmarks/bench_loader.py [--tokenizer runs/default/tokenizer.model] [--seq-len 2048]

* tokenized shards (``format: tokens``): the shards are written once from the bundled WARC
  (prepare_data --format tokens), then rank 0 of world size 1 and of 2 pulls micro-batches
  through ``GlobalBatchSlicer`` exactly as the trainer does;
* the on-the-fly chain (WARC -> filters -> tokenize -> pack): tokens/s and pipeline work
  (records and bytes read) of each rank at world size 1 and 2, in ``sequences`` mode (every
  rank runs the whole global stream) and ``shards`` mode (each rank its virtual shards).

One process, one core (torch and numpy threads set to 1). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

SAMPLE = os.path.join(REPO, "data_pipeline", "assets", "sample.warc.gz")


def _tokenizer(path: str | None, workdir: str) -> str:
    if path:
        return path
    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.pipeline import iter_texts
    from data_pipeline.tokenizer import train_tokenizer

    out = os.path.join(workdir, "tokenizer.model")
    train_tokenizer(iter_texts(DataConfig(sources=[SourceConfig(paths=[SAMPLE])]), 2000), out, vocab_size=8192)
    return out


def bench_token_shards(shards_dir: str, seq_len: int, micro: int, seconds: float) -> None:
    from data_pipeline.token_shards import TokenShards, TokenWindows
    from train.data import GlobalBatchSlicer

    sh = TokenShards([shards_dir])
    print(f"tokenized shards: {sh.total:,} tokens in {len(sh.files)} file(s), seq_len {seq_len}, micro-batch {micro}")
    for world in (1, 2, 8):
        it = GlobalBatchSlicer(TokenWindows(sh, seq_len, "train", 0.0, seed=0), micro, 1, 0, world)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            n += next(it)["input"].numel()
        dt = time.perf_counter() - t0
        print(f"  world size {world}: rank 0 receives {n / dt:,.0f} tokens/s")


def bench_on_the_fly(tokenizer_path: str, seq_len: int, micro: int, steps: int) -> None:
    """Each rank of world size 1 and 2, in ``sequences`` and ``shards`` mode, built by
    ``train.data.build_train_stream`` from the composed default config as the trainer does."""
    from hydra import compose, initialize_config_dir

    from data_pipeline.tokenizer import Tokenizer
    from train.config import register_configs
    from train.data import _readers, build_train_stream

    register_configs()
    tok = Tokenizer(tokenizer_path)
    print(f"on-the-fly chain (WARC -> filters -> tokenize -> pack), {steps} steps, global batch {2 * micro} "
          f"sequences of {seq_len} tokens:")
    for mode, workers in (("sequences", 0), ("shards", 0), ("shards", 2)):
        for world in (1, 2):
            for rank in range(world):
                with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
                    cfg = compose("pretrain", overrides=[f"train.data_sharding={mode}", f"data.seq_len={seq_len}",
                                                         f"train.micro_batch_size={2 * micro // world}",
                                                         f"data.num_workers={workers}"])
                it = build_train_stream(cfg, tok, rank, world)
                next(it)  # workers started, first windows in flight
                n, t0 = 0, time.perf_counter()
                for _ in range(steps):
                    n += next(it)["input"].numel()
                dt = time.perf_counter() - t0
                it.close()
                shards = getattr(it.windows, "shards", None)
                readers = ([r for sh in shards.values() for r in _readers(sh.docs)] if shards
                           else _readers(it.windows.docs))
                records = sum(r.stats.seen for r in readers)
                mb = sum(r.stats.bytes_seen for r in readers) / 1e6
                print(f"  {mode:9s} workers {workers} world size {world} rank {rank}: {n / dt:9,.0f} tokens/s to the "
                      "trainer; "
                      f"pipeline work {records} records, {mb:.1f} MB ({mb / dt:.2f} MB/s) for {n:,} tokens")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=100, help="steps of the on-the-fly chain per rank")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tok = _tokenizer(args.tokenizer, d)
        shards = os.path.join(d, "tokens")
        subprocess.run([sys.executable, os.path.join(REPO, "launch", "prepare_data.py"), "--output-dir", shards,
                        "--format", "tokens", "--tokenizer", tok, "data=sample"], check=True, capture_output=True)
        bench_token_shards(shards, args.seq_len, args.micro, args.seconds)
        bench_on_the_fly(tok, 256, args.micro, steps=args.steps)


if __name__ == "__main__":
    main()
