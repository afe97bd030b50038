"""CUDA checks the CPU test suite cannot make; run by ``benchmarks/gpu_suite.sh`` on one GPU.

1. The flash kernel serves kiln's plain causal attention in bf16 (SDPA restricted to
   FLASH_ATTENTION must accept the model's forward).
2. A non-logging training step makes no host-device sync
   (``torch.cuda.set_sync_debug_mode("error")`` around it).
3. Resume is exact on CUDA: 10 steps straight equal 5 + checkpoint + 5, bf16, compiled.
4. flex_attention's block-sparse document mask (the GPU default for packed documents)
   equals the dense SDPA mask in loss and gradients, fp32.

Prints PASS/FAIL per check; exits non-zero if any fails.
"""

from __future__ import annotations

import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from tests.conftest import compose  # noqa: E402  (Hydra composition exactly as the launchers do)

SMALL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.max_seq_len=1024",
         "data.seq_len=1024", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.eval_every=5",
         "train.eval_sequences=8", "train.log_every=5", "train.sample_tokens=0", "logger.plot=false",
         "train.max_steps=10", "checkpoint.every=5", "train.precision=bf16", "train.device=cuda"]


def check_flash() -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.llama import ModelConfig, Transformer

    m = Transformer(ModelConfig(d_model=512, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024,
                                max_seq_len=2048)).cuda()
    x = torch.randint(0, 1024, (2, 2048), device="cuda")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, _ = m(x)
    torch.cuda.synchronize()
    return f"flash attention served a (2, 2048) bf16 causal forward, logits {tuple(logits.shape)}"


def check_flex() -> str:
    from model.llama import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = dict(d_model=256, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=1024, max_seq_len=1024)
    dense = Transformer(ModelConfig(**cfg, attention="sdpa")).cuda()
    flex = Transformer(ModelConfig(**cfg, attention="flex")).cuda()
    flex.load_state_dict(dense.state_dict())
    x = torch.randint(0, 1024, (2, 1024), device="cuda")
    cuts = torch.tensor([[0, 300, 700, 1024], [0, 100, 900, 1024]])
    doc_ids = torch.zeros(2, 1024, dtype=torch.long)
    pos = torch.zeros(2, 1024, dtype=torch.long)
    for r in range(2):
        for d in range(3):
            a, b = int(cuts[r, d]), int(cuts[r, d + 1])
            doc_ids[r, a:b], pos[r, a:b] = d, torch.arange(b - a)
    losses, grads = [], []
    for m in (dense, flex):
        _, loss = m(x, x, position_ids=pos.cuda(), doc_ids=doc_ids.cuda())
        loss.backward()
        losses.append(float(loss))
        grads.append(m.layers[0].attn.wq.weight.grad)
    diff = float((grads[0] - grads[1]).abs().max())
    if abs(losses[0] - losses[1]) > 1e-4 or diff > 1e-4:
        raise AssertionError(f"flex {losses[1]} vs dense {losses[0]}, max grad diff {diff}")
    return f"flex block mask = dense mask: loss {losses[1]:.5f} vs {losses[0]:.5f}, max grad diff {diff:.2e}"


def check_no_sync(run_dir: str) -> str:
    from train.trainer import Trainer

    cfg = compose(SMALL + [f"run_dir={run_dir}", "train.compile=false"])
    tr = Trainer(cfg)
    micro = [next(tr.train_batches) for _ in range(2)]
    tr.forward_backward(micro)  # warm-up (allocations, lazy init)
    tr.backend.step(1e-4, 1.0)
    micro = [next(tr.train_batches) for _ in range(2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tr.forward_backward(micro)
        tr.backend.step(1e-4, 1.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "forward_backward + backend.step ran with sync debug mode 'error'"


def check_resume(root: str) -> str:
    from train.trainer import Trainer

    class StopAt(Trainer):
        stop_at = None

        def should_stop(self):
            return self.state.step == self.stop_at or super().should_stop()

    straight = StopAt(compose(SMALL + [f"run_dir={root}/a", "train.compile=true"])).fit()["losses"]
    first = StopAt(compose(SMALL + [f"run_dir={root}/b", "train.compile=true"]))
    first.stop_at = 5
    part = first.fit()["losses"]
    part.update(StopAt(compose(SMALL + [f"run_dir={root}/b", "train.compile=true"])).fit()["losses"])
    if part != straight:
        raise AssertionError(f"resumed {part} != straight {straight}")
    return f"10 bf16 compiled steps equal 5 + resume + 5 exactly (loss at 10: {straight[10]:.4f})"


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device")
        return 2
    failed = 0
    with tempfile.TemporaryDirectory() as d:
        for name, fn in (("flash", check_flash), ("flex", check_flex), ("no_sync", lambda: check_no_sync(f"{d}/sync")),
                         ("resume", lambda: check_resume(d))):
            try:
                print(f"PASS {name}: {fn()}", flush=True)
            except Exception as e:  # report every check, then fail
                failed += 1
                print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
