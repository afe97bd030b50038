"""How long building and initialising a model takes where it is built (issue 22, item 15):
``sharded_init.build_on_device`` (built on the meta device, then initialised in place on
the training device: what single, DDP and ZeRO-1/2 do) against building on the host with
``Transformer(cfg)`` (what they did before). Target: ``model=1b`` within 15 s on a CPU.

    python benchmarks/bench_init_speed.py                    # model=1b, vocab 32000, on the CPU
    python benchmarks/bench_init_speed.py --model 125m --device cuda --repeats 3

Both paths give the same tensors from the same seed (tests/test_sharded_init.py); here
only their time is measured (median of ``--repeats``, one thread per core this process may
use).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        model = fn()
        sync()
        times.append(time.perf_counter() - t0)
        del model
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b", help="a conf/model preset")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()

    import torch
    from omegaconf import OmegaConf

    from model.llama import ModelConfig, Transformer, param_count
    from train.sharded_init import build_on_device

    preset = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "conf", "model", f"{args.model}.yaml")))
    mc = ModelConfig(**{**preset, "vocab_size": args.vocab})
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    on_device = timed(lambda: build_on_device(Transformer, mc, device), args.repeats, sync)
    torch.manual_seed(0)
    on_host = timed(lambda: Transformer(mc).to(device), args.repeats, sync)
    n = param_count(mc)
    print(f"model={args.model} ({n / 1e9:.2f}B parameters, vocab {args.vocab}), device {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  built on the meta device, initialised on {device.type}: {on_device:7.2f} s  (target for 1b on a CPU: 15 s)")
    print(f"  built and initialised on the host, then moved:  {on_host:7.2f} s")


if __name__ == "__main__":
    main()
