"""Training throughput: tokens/s, MFU and peak memory of the real training step.

Runs the model forward+backward+AdamW on random tokens (no data pipeline, so the number is
the trainer's, not the reader's) for each requested model config, and prints one line per
configuration. Under torchrun/deepspeed, pass backend=... exactly as for launch/pretrain.py.

  python benchmarks/bench_train.py model=tiny
  python benchmarks/bench_train.py model=125m train=gpu data.seq_len=2048 train.micro_batch_size=8
  torchrun --nproc_per_node 8 benchmarks/bench_train.py model=1b backend=fsdp train=gpu
  deepspeed --num_gpus 8 benchmarks/bench_train.py model=1b backend=deepspeed backend.zero_stage=2 train=gpu

Extra keys (``bench.steps``, ``bench.warmup``) are read from the environment:
KILN_BENCH_STEPS (default 20), KILN_BENCH_WARMUP (default 5).
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))
import _bootstrap  # noqa: F401,E402
import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from train.config import register_configs, validate  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    from model.llama import ModelConfig, Transformer, flops_per_token, param_count
    from train.activation_checkpointing import apply_activation_checkpointing
    from train.backends import build_backend
    from train.compile import compile_blocks
    from train.metrics import peak_flops, peak_memory_gb

    validate(cfg)
    steps, warmup = int(os.environ.get("KILN_BENCH_STEPS", 20)), int(os.environ.get("KILN_BENCH_WARMUP", 5))
    backend = build_backend(cfg)
    mc = ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))
    mc.vocab_size = mc.vocab_size or 32000
    torch.manual_seed(0)
    model = Transformer(mc)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        compile_blocks(model)
    backend.setup(model)
    dev = backend.device
    bf16 = backend.bf16
    T, B, A = cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    x = torch.randint(0, mc.vocab_size, (B, T + 1), device=dev)
    tokens_per_step = B * T * A * backend.world_size

    def one_step():
        for micro in range(A):
            with backend.micro_step_context(micro == A - 1):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                    _, loss = backend.model(x[:, :-1], x[:, 1:])
                backend.backward(loss / A)
        backend.step(cfg.optim.lr, cfg.optim.grad_clip)

    for _ in range(warmup):
        one_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = tokens_per_step * steps / dt
    peak = peak_flops(dev, cfg.train.peak_tflops)
    mfu = flops_per_token(mc, T) * tps / backend.world_size / peak if peak else float("nan")
    if backend.is_main:
        print(f"[bench_train] model={mc.d_model}x{mc.n_layers} params={param_count(mc) / 1e6:.1f}M "
              f"backend={backend.name}{'-z' + str(cfg.backend.zero_stage) if backend.name == 'deepspeed' else ''} "
              f"world={backend.world_size} device={dev} bf16={bf16} compile={cfg.train.compile} "
              f"ac={cfg.train.activation_checkpointing} seq={T} micro={B} accum={A}: "
              f"{tps:,.0f} tokens/s ({tps / backend.world_size:,.0f} per device), "
              f"{dt / steps * 1000:.1f} ms/step, MFU {mfu:.1%}, peak memory {peak_memory_gb(dev):.2f} GiB",
              flush=True)
    backend.shutdown()


if __name__ == "__main__":
    main()
