"""What a checkpoint costs training, on this machine.

    python benchmarks/bench_checkpoint.py hash [--gb 1.0]
    python benchmarks/bench_checkpoint.py save [--model 1b] [--layers N] [--nproc 2]

``hash``: seconds per GB to hash a file (the manifest at save, ``checkpoint.verify=full``
at load) against the alternatives; the file is read from the page cache after a first
pass, so the numbers are the hashing cost (a cold read adds the disk's throughput).

``save``: real 2-process FSDP runs (``torchrun``, gloo on CPU) of ``launch/pretrain.py``
that save after steps 2, 4 and 6, once with ``checkpoint.async_save=false`` and once with
``true`` (``--modes`` runs one). It prints the time training is blocked by the save of step
4 (from the run's own ``checkpoint`` records: the whole save when synchronous; when
asynchronous, starting it, the optimizer step's wait for the host copy, and the commit),
the time until that checkpoint was durable, the training step time just after a save
against before any (a background write competes with training for the host's cores), and
rank 0's hashing time when every rank hashes its own files, against rank 0 hashing the
whole checkpoint alone (measured here, over the same files, fsync included).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
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


def bench_hash(args) -> None:
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


def _fsdp_run(run_dir: str, args, async_save: bool) -> dict:
    import json
    import random
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = ["torchrun", "--nproc_per_node", str(args.nproc), "--master_port", str(random.randint(20000, 40000)),
           "launch/pretrain.py", f"model={args.model}", "backend=fsdp", f"run_dir={run_dir}", "train.max_steps=6",
           "checkpoint.every=2", "checkpoint.keep_last=2", f"checkpoint.async_save={str(async_save).lower()}",
           "train.micro_batch_size=1", "data.seq_len=64", "train.eval_every=0", "train.sample_tokens=0",
           "logger.plot=false", "train.log_every=1", *args.overrides]
    if args.layers:
        cmd.append(f"model.n_layers={args.layers}")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // args.nproc)))
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    saves = [r for r in records if r["kind"] == "checkpoint"]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    out = dict(saves[1])  # step 4: not the first save (warm-up), not the last (waited for at the end)
    # Seconds of training per step (checkpointing excluded: the trainer's own accounting), for
    # the steps just after a save (3 and 5: a background write in flight when async) and the
    # steps before any save (2; step 1 warms up).
    per_step = {s: (r["tokens"] - train.get(s - 1, {"tokens": 0})["tokens"]) / r["tokens_per_s"]
                for s, r in train.items()}
    out["step_s_after_save"] = (per_step[3] + per_step[5]) / 2
    out["step_s_clean"] = per_step[2]
    return out


def bench_save(args) -> None:
    modes = {"both": (False, True), "sync": (False,), "async": (True,)}[args.modes]
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        rows = {}
        for mode in modes:
            run_dir = os.path.join(d, "async" if mode else "sync")
            rows[mode] = _fsdp_run(run_dir, args, mode)
            step_dir = rows[mode]["checkpoint"]
            size = sum(e["size"] for e in ckpt.read_meta(step_dir)["files"].values())
            t0 = time.perf_counter()
            ckpt.manifest(step_dir)  # rank 0 alone: every file, fsync and hash
            rows[mode]["rank0_alone_s"] = time.perf_counter() - t0
            shutil.rmtree(run_dir)  # 1b: 12 GB a checkpoint; two runs' worth may not fit the disk
    layers = f" with {args.layers} layers" if args.layers else ""
    print(f"model={args.model}{layers}, FSDP x {args.nproc} processes (gloo, CPU), checkpoint {size / 1e9:.2f} GB "
          f"(weights + AdamW moments)")
    for mode, r in rows.items():
        name = "async" if mode else "synchronous"
        print(f"  {name:12s} training blocked by the save of step 4 {r['blocked_s']:7.2f} s; durable after "
              f"{r['durable_after_s']:7.2f} s; training step after a save {r['step_s_after_save']:6.2f} s "
              f"(before any save {r['step_s_clean']:6.2f} s)")
        parts = {k[len("blocked_"):-2]: v for k, v in r.items() if k.startswith("blocked_") and k != "blocked_s"}
        print(f"  {'':12s} blocked, by part: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
        per_rank = r["hash_s_per_rank"]
        print(f"  {'':12s} rank 0 hashing (fsync+xxh3) per-rank {per_rank[0]:7.2f} s (ranks: "
              f"{', '.join(f'{h:.2f}' for h in per_rank)}); rank 0 alone {r['rank0_alone_s']:7.2f} s")
    if len(rows) == 2:
        print(f"  async blocked / synchronous blocked: {rows[True]['blocked_s'] / rows[False]['blocked_s']:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    h = sub.add_parser("hash")
    h.add_argument("--gb", type=float, default=1.0)
    s = sub.add_parser("save")
    s.add_argument("--model", default="1b")
    s.add_argument("--layers", type=int, default=0, help="override model.n_layers (0: the model's own)")
    s.add_argument("--nproc", type=int, default=2)
    s.add_argument("--dir", default=None, help="where the runs write (default: the system temp dir)")
    s.add_argument("--modes", choices=("both", "sync", "async"), default="both")
    s.add_argument("overrides", nargs="*", help="more Hydra overrides for the runs")
    args = ap.parse_args()
    bench_hash(args) if args.what == "hash" else bench_save(args)


if __name__ == "__main__":
    main()
