"""Rollout generation throughput per backend: sampled tokens/s of train/rl/rollout.py's
``sample`` on one process against 2 CPU processes (gloo) under DDP, FSDP and ZeRO-3. Under
FSDP and ZeRO-3 the parameters are gathered once per rollout batch
(``gathered_for_generation``) and, for comparison, by the backend's own hooks for every
decoding step (plain ``generate`` on the sharded model).

  python benchmarks/bench_rollout.py                 # the single row, then torchrun (DDP, FSDP) and deepspeed (ZeRO-3)
  python benchmarks/bench_rollout.py --rows 8 --new 32 --d-model 256 --layers 4

Every rank samples its own batch of ``--rows`` prompts for exactly ``--new`` tokens (no stop
id, so every rank runs the same number of decoding steps); tokens/s counts the tokens of all
ranks over the slowest rank's time, median of ``--repeats``. Also checks that the gathered
FSDP rollout samples the same tokens as one process from the same weights and seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.ports import free_port  # noqa: E402


def build(args, backend_name: str):
    import torch

    from model.llama import ModelConfig, Transformer
    from tests.conftest import compose
    from train.backends import build_backend
    from train.config import register_configs

    register_configs()
    extra = ["backend.zero_stage=3"] if backend_name == "deepspeed" else []
    cfg = compose([f"backend={backend_name}", *extra, "train.device=cpu", "train.precision=fp32",
                   f"run_dir={args.tmp}"])
    b = build_backend(cfg)
    torch.manual_seed(0)
    mc = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=8, n_kv_heads=4, vocab_size=args.vocab,
                     max_seq_len=256)
    model = Transformer(mc)
    b.setup(model)
    return b, mc


def prompts_for(rank: int, rows: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(rank)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(8, 24))] for _ in range(rows)]


def run(args, backend_name: str) -> dict:
    import torch
    import torch.distributed as dist

    from model.llama import generate
    from train.rl.rollout import sample

    torch.set_num_threads(1)
    b, mc = build(args, backend_name)
    prompts = prompts_for(b.rank, args.rows, mc.vocab_size)
    model = b.raw_model
    out = {}

    def timed(fn):
        times = []
        for i in range(args.repeats + 1):
            b.barrier()
            t0 = time.perf_counter()
            result = fn(i)
            dt = time.perf_counter() - t0
            dt = max(b.all_gather_object(dt)) if b.world_size > 1 else dt
            if i:  # the first is warm-up
                times.append(dt)
        return statistics.median(times), result

    def gathered(i):
        g = torch.Generator().manual_seed(100 + i)
        return sample(model, prompts, args.new, 1.0, 1.0, [], 0, g, b.device, zero3_offload=b.zero3_offload(model))

    dt, r = timed(gathered)
    out["gathered_tokens_per_s"] = args.rows * args.new * b.world_size / dt
    out["tokens_rank0"] = r.responses[:, :args.new].tolist()
    if b.world_size > 1 and backend_name != "ddp":  # a replica has nothing to gather
        def per_step(i):
            g = torch.Generator().manual_seed(100 + i)
            return generate(model, prompts, args.new, temperature=1.0, generator=g, device=b.device)

        dt, _ = timed(per_step)
        out["per_step_tokens_per_s"] = args.rows * args.new * b.world_size / dt
    if b.is_main and args.out:
        with open(args.out, "w") as f:
            json.dump(out, f)
    if dist.is_initialized():
        dist.barrier()
    b.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="/tmp/kiln_bench_rollout")
    args = p.parse_args()
    if args.worker:
        run(args, args.worker)
        return
    single = run(args, "single")
    os.makedirs(args.tmp, exist_ok=True)
    sizes = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k in ("rows", "new", "d_model", "layers", "vocab", "repeats")]
    rows = {}
    for backend, start in (("ddp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
                           ("fsdp", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]),
                           ("deepspeed", ["deepspeed", "--no_local_rank", "--num_gpus", "2"])):
        out = os.path.join(args.tmp, f"{backend}.json")
        cmd = [*start, "--master_port", free_port(), os.path.abspath(__file__), "--worker", backend, "--out", out,
               *sizes]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(out) as f:
            rows[backend] = json.load(f)
    print(f"rollout generation, {args.rows} prompts x {args.new} new tokens per process, d_model={args.d_model} "
          f"layers={args.layers} vocab={args.vocab}, CPU, fp32, median of {args.repeats}")
    print(f"  single, 1 process:                              {single['gathered_tokens_per_s']:8.1f} tokens/s")
    print(f"  DDP, 2 processes:                               {rows['ddp']['gathered_tokens_per_s']:8.1f} tokens/s "
          "(both ranks)")
    for backend, name in (("fsdp", "FSDP"), ("deepspeed", "ZeRO-3")):
        r = rows[backend]
        print(f"  {name + ', 2 processes, gathered once per batch:':47} {r['gathered_tokens_per_s']:8.1f} tokens/s "
              "(both ranks)")
        print(f"  {name + ', 2 processes, gathered every step:':47} {r['per_step_tokens_per_s']:8.1f} tokens/s "
              "(both ranks)")
    for backend, r in rows.items():
        print(f"  {backend} rank 0 sampled the same tokens as one process: {r['tokens_rank0'] == single['tokens_rank0']}")


if __name__ == "__main__":
    main()
