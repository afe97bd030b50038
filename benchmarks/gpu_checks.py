"""CUDA checks the CPU test suite cannot make; run last by ``benchmarks/gpu_suite.py``, or alone:

    python benchmarks/gpu_checks.py           # on one GPU
    python benchmarks/gpu_checks.py --cpu     # the resume check on the CPU, tiny (tests its machinery)

1. The flash kernel serves kiln's plain causal attention in bf16 (SDPA restricted to
   FLASH_ATTENTION must accept the model's forward).
2. flex_attention's block-sparse document mask (the GPU default for packed documents)
   equals the dense SDPA mask in loss and gradients, fp32 (tolerance 1e-4).
3. A non-logging training step makes no host-device sync
   (``torch.cuda.set_sync_debug_mode("error")`` around it).
4. Resume is exact on CUDA: 10 steps straight equal 5 + checkpoint + 5, bf16, compiled, compared
   bit for bit. Exactness needs deterministic kernels: flash attention's backward accumulates
   dQ with atomics in an order that varies between runs (flash-attention#414), as do some
   cuBLAS reductions, so this check runs under ``torch.use_deterministic_algorithms(True)``
   (deterministic flash / flex backward, Inductor's deterministic lowerings) with
   ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set when this module is imported, before CUDA starts
   (a value already in the environment is kept). An op with no deterministic version then
   fails the check naming the op; a mismatch reports the first step that differs and the
   largest difference, to tell a kernel that is still not deterministic (differences in the
   last bits) from a resume that lost state (differences from the resumed step on).

Needs only kiln's install (``pip install -e .``): no test helpers, no pytest. Prints PASS/FAIL
per check; exits 1 if any fails, 2 without a CUDA device.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before anything starts CUDA (check 4)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf")
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402

SMALL = ["model.d_model=512", "model.n_layers=4", "model.n_heads=8", "model.n_kv_heads=4", "model.max_seq_len=1024",
         "data.seq_len=1024", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.eval_every=5",
         "train.eval_sequences=8", "train.log_every=5", "train.sample_tokens=0", "logger.plot=false",
         "train.max_steps=10", "checkpoint.every=5", "train.precision=bf16", "train.device=cuda"]
# --cpu: the same run, tiny, fp32, eager (a few seconds on two cores).
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.micro_batch_size=4", "train.grad_accum_steps=2", "train.eval_every=5",
        "train.eval_sequences=8", "train.log_every=5", "train.sample_tokens=0", "logger.plot=false",
        "train.max_steps=10", "checkpoint.every=5", "train.precision=fp32", "train.device=cpu"]


def compose(overrides=(), config_name: str = "pretrain"):
    """The config launch/pretrain.py would see for these command-line overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return hydra_compose(config_name, overrides=list(overrides))


def make_tokenizer(directory: str) -> str:
    """One small tokenizer (1024 pieces) trained on the bundled sample, shared by every run here
    instead of each run directory training its own."""
    from data_pipeline.pipeline import iter_texts
    from data_pipeline.tokenizer import train_tokenizer

    path = os.path.join(directory, "tokenizer.model")
    train_tokenizer(iter_texts(compose().data, 120), path, vocab_size=1024)
    return path


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


def check_no_sync(run_dir: str, tokenizer: str) -> str:
    from train.trainer import Trainer

    cfg = compose(SMALL + [f"run_dir={run_dir}", f"tokenizer.path={tokenizer}", "train.compile=false"])
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
    if hasattr(tr.train_batches, "close"):
        tr.train_batches.close()
    return "forward_backward + backend.step ran with sync debug mode 'error'"


def compare_losses(straight: dict, resumed: dict) -> str:
    """'' when equal bit for bit, else what differs."""
    if resumed == straight:
        return ""
    if set(resumed) != set(straight):
        return f"steps differ: resumed {sorted(resumed)} vs straight {sorted(straight)}"
    differ = [s for s in sorted(straight) if resumed[s] != straight[s]]
    worst = max(abs(resumed[s] - straight[s]) for s in differ)
    return (f"losses differ from step {differ[0]} on ({len(differ)} of {len(straight)} steps), largest difference "
            f"{worst:.3e}: resumed {resumed} vs straight {straight}")


def check_resume(root: str, tokenizer: str, small=SMALL, compiled: bool = True) -> str:
    """10 steps straight == 5 + checkpoint + resume + 5, bit for bit, under deterministic algorithms."""
    from train.trainer import Trainer

    class StopAt(Trainer):
        stop_at = None

        def should_stop(self):
            return self.state.step == self.stop_at or super().should_stop()

    def cfg(run: str):
        return compose(small + [f"run_dir={root}/{run}", f"tokenizer.path={tokenizer}",
                                f"train.compile={str(compiled).lower()}"])

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        straight = StopAt(cfg("a")).fit()["losses"]
        first = StopAt(cfg("b"))
        first.stop_at = 5
        part = first.fit()["losses"]
        part.update(StopAt(cfg("b")).fit()["losses"])
    finally:
        torch.use_deterministic_algorithms(was)
    problem = compare_losses(straight, part)
    if problem:
        raise AssertionError(f"deterministic algorithms on, CUBLAS_WORKSPACE_CONFIG="
                             f"{os.environ.get('CUBLAS_WORKSPACE_CONFIG')}: {problem}")
    last = max(straight)
    return (f"{len(straight)} {'compiled ' if compiled else ''}steps equal {first.stop_at} + resume + "
            f"{len(straight) - first.stop_at} bit for bit under deterministic algorithms "
            f"(loss at {last}: {straight[last]:.4f})")


def run_checks(checks) -> int:
    failed = 0
    for name, fn in checks:
        try:
            print(f"PASS {name}: {fn()}", flush=True)
        except Exception as e:  # report every check, then fail
            failed += 1
            import traceback

            traceback.print_exc()
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as d:
        if argv == ["--cpu"]:
            tok = make_tokenizer(d)
            return run_checks([("resume", lambda: check_resume(d, tok, TINY, compiled=False))])
        if argv:
            print(f"usage: {os.path.basename(__file__)} [--cpu]", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print("gpu_checks: no CUDA device")
            return 2
        tok = make_tokenizer(d)
        return run_checks([("flash", check_flash), ("flex", check_flex),
                           ("no_sync", lambda: check_no_sync(f"{d}/sync", tok)), ("resume", lambda: check_resume(d, tok))])


if __name__ == "__main__":
    sys.exit(main())
