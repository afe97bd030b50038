"""Rollouts under FSDP2 on 2 real processes (gloo): the parameters are gathered once per
rollout batch, the gathered rollout samples what one process samples from the same weights,
and afterwards the model is sharded again with its reshard settings as before.

One launch (``torchrun --nproc_per_node 2 -m tests.test_rl_fsdp_rollout OUT``) runs the probe
below and writes what rank 0 observed; the tests read it. All-gathers are counted by wrapping
``torch.distributed.all_gather_single`` (what FSDP2 calls), not replaced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
NEW = 6


def probe(out_path: str) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from model.llama import ModelConfig, Transformer, generate
    from tests.conftest import compose
    from train.backends import build_backend
    from train.config import register_configs
    from train.rl.rollout import sample

    torch.set_num_threads(1)
    register_configs()
    cfg = compose(["backend=fsdp", "train.device=cpu", "train.precision=fp32", "run_dir=/tmp/kiln_rl_fsdp_probe"])
    b = build_backend(cfg)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=32))
    single, control = copy.deepcopy(model), copy.deepcopy(model)
    b.setup(model)
    counts = {"n": 0}
    real = dist.all_gather_single

    def counting(*a, **k):
        counts["n"] += 1
        return real(*a, **k)

    dist.all_gather_single = counting

    def gathers(fn):
        counts["n"] = 0
        result = fn()
        return counts["n"], result

    rows = [[t + b.rank for t in p] for p in PROMPTS]  # every rank its own prompts
    n_once, r = gathers(lambda: sample(model, rows, NEW, 1.0, 1.0, [], 0, torch.Generator().manual_seed(7),
                                       b.device))
    x = torch.tensor(rows[0][:1] * 4)[None]
    n_after, _ = gathers(lambda: [model(x) for _ in range(2)])  # right after the rollout
    model.reshard()
    n_step, _ = gathers(lambda: generate(model, rows, NEW, temperature=1.0, generator=torch.Generator().manual_seed(7),
                                         device=b.device))
    # A second sharded copy that never went through a rollout: its forwards gather as many times.
    b2 = build_backend(cfg)
    b2.setup(control)
    n_control, _ = gathers(lambda: [control(x) for _ in range(2)])
    ref = sample(single, rows, NEW, 1.0, 1.0, [], 0, torch.Generator().manual_seed(7), torch.device("cpu"))
    wq = model.layers[0].attn.wq.weight
    result = {"rank": b.rank, "fsdp_modules": sum(1 for m in model.modules() if hasattr(m, "unshard")),
              "gathers_once": n_once, "gathers_per_step": n_step, "gathers_after": n_after,
              "gathers_control": n_control, "same_tokens": bool(torch.equal(r.responses, ref.responses)),
              "max_logprob_diff": float((r.logprobs - ref.logprobs).abs().max()),
              "sharded_after": type(wq).__name__ == "DTensor" and wq.to_local().shape[0] == wq.shape[0] // 2}
    results = b.all_gather_object(result)
    if b.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    b.shutdown()


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    out = tmp_path_factory.mktemp("rl_fsdp") / "out.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                        "tests.test_rl_fsdp_rollout", str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_fsdp_rollout_gathers_each_module_once_per_batch(observed):
    for r in observed:
        assert r["gathers_once"] == r["fsdp_modules"] == 3  # 2 blocks + the root
        assert r["gathers_per_step"] == NEW * 2 + 1  # FSDP's own hooks: every block at every decoding step


def test_fsdp_rollout_samples_what_one_process_samples(observed):
    for r in observed:
        assert r["same_tokens"], r
        assert r["max_logprob_diff"] < 1e-5, r


def test_after_a_rollout_the_model_is_sharded_with_its_settings_restored(observed):
    for r in observed:
        assert r["sharded_after"]
        assert r["gathers_after"] == r["gathers_control"] > 0


if __name__ == "__main__":
    probe(sys.argv[1])
