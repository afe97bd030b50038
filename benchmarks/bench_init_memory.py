"""Peak host memory per rank for launching a model: the Trainer's whole set-up (tokenizer,
model, sharding, optimizer, data streams) under a 2-process launch on the CPU.

    python benchmarks/bench_init_memory.py                      # 1b, FSDP, 2 ranks
    python benchmarks/bench_init_memory.py --backend deepspeed  # ZeRO-3 under zero.Init
    python benchmarks/bench_init_memory.py --full-init          # for comparison: every rank
                                                                # builds the whole model first

Prints each rank's peak RSS after set-up, the full fp32 model's size and the target of
issue 13: at most 60% of the full fp32 model plus 1.5 GB per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker(args) -> None:
    from model.llama import param_count
    from tests.conftest import compose
    from train.trainer import Trainer

    if args.full_init:  # the old way, for the comparison row: build whole, then shard
        from train.backends.deepspeed import DeepSpeedBackend
        from train.backends.fsdp import FSDPBackend

        FSDPBackend.builds_deferred = False
        DeepSpeedBackend.builds_deferred = property(lambda self: False)
    before = peak_rss_gb()
    overrides = [f"model={args.model}", f"model.vocab_size={args.vocab}", "train.device=cpu",
                 f"tokenizer.path={args.tokenizer}", f"run_dir={args.run_dir}", "data.seq_len=256",
                 "train.micro_batch_size=1", "logger.plot=false"]
    if args.backend == "fsdp":
        overrides.append("backend=fsdp")
    else:
        overrides += ["backend=deepspeed", "backend.zero_stage=3"]
    trainer = Trainer(compose(overrides))
    rows = trainer.backend.all_gather_object({"rank": trainer.backend.rank, "before_gb": before,
                                              "after_setup_gb": peak_rss_gb()})
    if trainer.backend.is_main:
        full_gb = param_count(trainer.model_cfg) * 4 / 2**30
        print(json.dumps({"model": args.model, "backend": args.backend, "full_init": args.full_init,
                          "parameters": param_count(trainer.model_cfg), "full_fp32_gb": round(full_gb, 3),
                          "target_gb": round(0.6 * full_gb + 1.5, 3), "ranks": rows}), flush=True)
    trainer.backend.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b")
    ap.add_argument("--vocab", type=int, default=32000, help="model.vocab_size (the 1b shape with a 32k vocabulary)")
    ap.add_argument("--backend", choices=["fsdp", "deepspeed"], default="fsdp")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--full-init", action="store_true")
    ap.add_argument("--tokenizer", help="a tokenizer.model (default: one trained on the embedded corpus)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher passes it
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.tokenizer:
            from data_pipeline.config import DataConfig, SourceConfig
            from data_pipeline.pipeline import iter_texts
            from data_pipeline.tokenizer import train_tokenizer

            args.tokenizer = os.path.join(tmp, "tokenizer.model")
            warc = os.path.join(REPO, "data_pipeline", "assets", "sample.warc.gz")
            train_tokenizer(iter_texts(DataConfig(sources=[SourceConfig(paths=[warc])]), max_docs=120),
                            args.tokenizer, vocab_size=1024)
        port = str(random.randint(20000, 40000))
        starter = (["torchrun", "--nproc_per_node", str(args.nproc), "--master_port", port] if args.backend == "fsdp"
                   else ["deepspeed", "--num_gpus", str(args.nproc), "--master_port", port])
        cmd = [*starter, os.path.abspath(__file__), "--worker", "--model", args.model, "--vocab", str(args.vocab),
               "--backend", args.backend, "--tokenizer", args.tokenizer, "--run-dir", os.path.join(tmp, "run")]
        if args.full_init:
            cmd.append("--full-init")
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith('{"model"')]
        if p.returncode != 0 or not lines:
            sys.exit(f"bench_init_memory: the launch failed\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        r = json.loads(lines[-1])
        how = "whole model on every rank, then sharded" if r["full_init"] else "sharded initialisation"
        print(f"{r['model']} ({r['parameters'] / 1e9:.2f}B parameters, {r['full_fp32_gb']:.2f} GB in fp32), "
              f"{args.backend}, {args.nproc} ranks on the CPU, {how}")
        print(f"{'rank':>4} {'RSS after imports':>18} {'peak RSS after set-up':>22} {'target':>8}")
        for row in r["ranks"]:
            ok = "ok" if row["after_setup_gb"] <= r["target_gb"] else "OVER"
            print(f"{row['rank']:>4} {row['before_gb']:>15.2f} GB {row['after_setup_gb']:>19.2f} GB "
                  f"{r['target_gb']:>5.2f} GB {ok}")


if __name__ == "__main__":
    main()
