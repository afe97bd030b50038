"""Training throughput: tokens/s, MFU and peak memory of the real training step.

Times the trainer's own step (``Trainer.forward_backward`` + ``backend.step``, with the
model, compile, activation checkpointing and backend set up by the trainer) on random tokens
(no data pipeline, so the number is the trainer's, not the reader's) for each requested model config, and prints one line per
configuration. Under torchrun/deepspeed, pass backend=... exactly as for launch/pretrain.py.

  python benchmarks/bench_train.py model=tiny
  python benchmarks/bench_train.py model=125m train=gpu data.seq_len=2048 train.micro_batch_size=8
  torchrun --nproc_per_node 8 benchmarks/bench_train.py model=1b backend=fsdp train=gpu
  deepspeed --num_gpus 8 benchmarks/bench_train.py model=1b backend=deepspeed backend.zero_stage=2 train=gpu

Extra keys (``bench.steps``, ``bench.warmup``) are read from the environment:
KILN_BENCH_STEPS (default 20), KILN_BENCH_WARMUP (default 5). KILN_BENCH_DATA=real feeds
the configured data instead (tokenizer, data pipeline or token shards, data.num_workers)
and also times the same real batches replayed from memory, so the loader's cost is the
difference (random tokens differ from packed text: no document masks):

  python benchmarks/bench_train.py tokenizer.path=runs/default/tokenizer.model
  KILN_BENCH_DATA=real python benchmarks/bench_train.py tokenizer.path=runs/default/tokenizer.model data.num_workers=1

KILN_BENCH_HF=1 (one process) also trains Hugging Face transformers' LlamaForCausalLM of the
same shape with torch AdamW on the same batches, in interleaved rounds (kiln, HF, kiln, ...,
so drift on a shared machine hits both alike), and prints the steps/s ratio:

  KILN_BENCH_HF=1 python benchmarks/bench_train.py model=tiny model.vocab_size=8192 train.device=cpu
  KILN_BENCH_HF=1 python benchmarks/bench_train.py model=tiny model.vocab_size=8192 train.device=cpu train.compile=true
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "launch"))
import _bootstrap  # noqa: F401,E402
import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from train.config import register_configs, validate  # noqa: E402

register_configs()


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    import itertools
    import tempfile
    from types import SimpleNamespace

    from model.llama import param_count
    from train.metrics import peak_memory_gb
    from train.trainer import Trainer

    validate(cfg)
    steps, warmup = int(os.environ.get("KILN_BENCH_STEPS", 20)), int(os.environ.get("KILN_BENCH_WARMUP", 5))
    T, B, A = cfg.data.seq_len, cfg.train.micro_batch_size, cfg.train.grad_accum_steps
    vocab = cfg.model.vocab_size or 32000
    if cfg.tokenizer.path:  # the vocabulary a real run would have, so both feeds train the same model
        from data_pipeline.tokenizer import Tokenizer

        vocab = Tokenizer(cfg.tokenizer.path).vocab_size

    class SyntheticTrainer(Trainer):
        """The trainer itself -- model set-up, backend, forward_backward, backend.step --
        fed random tokens instead of the data pipeline."""

        def build_tokenizer(self):
            return SimpleNamespace(vocab_size=vocab, path=None)

        def build_data(self):
            x = torch.randint(0, vocab, (B, T + 1))
            return itertools.repeat({"input": x[:, :-1], "target": x[:, 1:]}), []

    real = os.environ.get("KILN_BENCH_DATA", "synthetic") == "real"
    cfg.run_dir = tempfile.mkdtemp(prefix="kiln-bench-")
    trainer = (Trainer if real else SyntheticTrainer)(cfg)
    backend, dev, mc = trainer.backend, trainer.backend.device, trainer.model_cfg

    def one_step(batches):
        trainer.forward_backward([next(batches) for _ in range(A)])
        backend.step(cfg.optim.lr, cfg.optim.grad_clip)

    def timed(batches, n: int) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            one_step(batches)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        one_step(trainer.train_batches)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dt = timed(trainer.train_batches, steps)
    replay_note = ""
    if real:  # the same real batches (document masks included) replayed from memory: no loader work
        cached = itertools.cycle([next(trainer.train_batches) for _ in range(A)])
        dt_replay = timed(cached, steps // 2) + timed(cached, steps - steps // 2)
        dt += timed(trainer.train_batches, steps)  # loader again, so drift hits both alike
        dt /= 2
        replay_note = (f"; replayed from memory {steps / dt_replay:.3f} steps/s: the loader costs "
                       f"{(dt - dt_replay) / dt_replay:+.1%}")
    tps = B * T * A * backend.world_size * steps / dt
    mfu = trainer.flops_per_token * tps / backend.world_size / trainer.peak if trainer.peak else float("nan")
    if backend.is_main:
        print(f"[bench_train] model={mc.d_model}x{mc.n_layers} params={param_count(mc) / 1e6:.1f}M "
              f"backend={backend.name}{'-z' + str(cfg.backend.zero_stage) if backend.name == 'deepspeed' else ''} "
              f"world={backend.world_size} device={dev} bf16={backend.bf16} compile={cfg.train.compile} "
              f"ac={cfg.train.activation_checkpointing} seq={T} micro={B} accum={A} "
              f"data={'real' if real else 'synthetic'} workers={cfg.data.num_workers if real else 0}: "
              f"{tps:,.0f} tokens/s ({tps / backend.world_size:,.0f} per device), "
              f"{dt / steps * 1000:.1f} ms/step ({steps / dt:.3f} steps/s), MFU {mfu:.1%}, "
              f"peak memory {peak_memory_gb(dev):.2f} GiB{replay_note}", flush=True)
    if os.environ.get("KILN_BENCH_HF") == "1" and not real and backend.world_size == 1 and backend.is_main:
        compare_with_hf(trainer, timed, steps, cfg)
    if hasattr(trainer.train_batches, "close"):
        trainer.train_batches.close()
    backend.shutdown()


def compare_with_hf(trainer, timed, steps: int, cfg) -> None:
    """kiln's trainer step against transformers' LlamaForCausalLM of the same shape on the
    same batch, learning rate and clipping (bf16 autocast when kiln runs bf16), with torch
    AdamW as a user gets it by default and with ``fused=True``."""
    import contextlib

    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf_interop import hf_config_dict

    mc, dev, o, A = trainer.model_cfg, trainer.backend.device, cfg.optim, cfg.train.grad_accum_steps
    batch = next(trainer.train_batches)
    x, y = batch["input"].to(dev), batch["target"].to(dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if trainer.use_bf16 else contextlib.nullcontext()

    def hf_runner(fused: bool):
        hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(mc, 1, 2, None), attn_implementation="sdpa")).to(dev)
        opt = torch.optim.AdamW(hf.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                weight_decay=o.weight_decay, **({"fused": True} if fused else {}))

        def run(n: int) -> float:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                for _ in range(A):
                    with autocast:
                        logits = hf(input_ids=x).logits
                    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / A
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(hf.parameters(), o.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        run(3)  # warm-up
        return run

    hf_default, hf_fused = hf_runner(False), hf_runner(True)
    kiln_t = default_t = fused_t = 0.0
    rounds = 3
    for _ in range(rounds):
        kiln_t += timed(trainer.train_batches, steps)
        default_t += hf_default(steps)
        fused_t += hf_fused(steps)
    n = rounds * steps
    print(f"[bench_train] vs transformers LlamaForCausalLM, {rounds} interleaved rounds of {steps} steps "
          f"(kiln compile={cfg.train.compile}): kiln {n / kiln_t:.3f} steps/s; HF + torch AdamW (default) "
          f"{n / default_t:.3f} steps/s, kiln {default_t / kiln_t:.2f}x; HF + torch AdamW(fused=True) "
          f"{n / fused_t:.3f} steps/s, kiln {fused_t / kiln_t:.2f}x", flush=True)


if __name__ == "__main__":
    main()
