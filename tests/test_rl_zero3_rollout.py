"""Rollouts under ZeRO-3 on 2 real processes (deepspeed launcher, gloo): the parameters are
gathered once per rollout batch with the engine's hooks off, ranks may stop decoding at
different steps, the rollout samples what one process samples, and afterwards the hooks
gather around each forward again.

One launch (``deepspeed --num_gpus 2 tests/test_rl_zero3_rollout.py OUT``) runs the probe
and writes what each rank observed. Gathers are measured as elements received, by wrapping
(not replacing) the gather functions of ``deepspeed.comm`` that ZeRO-3 calls. The model's
matrices are above ZeRO-3's persistence threshold (1e5 elements), so its hooks free them
after each forward, as they do at any real size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
NEW = 6


def probe(out_path: str) -> None:
    import copy

    import deepspeed.comm as dscomm
    import torch
    import torch.distributed as dist

    from model.llama import ModelConfig, Transformer, generate
    from tests.conftest import compose
    from train.backends import build_backend
    from train.config import register_configs
    from train.rl.rollout import sample

    torch.set_num_threads(1)
    register_configs()
    cfg = compose(["backend=deepspeed", "backend.zero_stage=3", "train.device=cpu", "train.precision=fp32",
                   f"run_dir={os.path.dirname(out_path)}/run"])
    b = build_backend(cfg)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=384, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=512, max_seq_len=32))
    single = copy.deepcopy(model)
    b.setup(model)
    m, offload = b.raw_model, b.zero3_offload(b.raw_model)
    received = {"n": 0}
    def counted(real):
        def counting(*a, **k):
            out = k.get("output_tensor", k.get("tensor_list", a[0] if a else None))
            received["n"] += sum(t.numel() for t in out) if isinstance(out, (list, tuple)) else out.numel()
            return real(*a, **k)
        return counting

    for name in ("all_gather_into_tensor", "all_gather", "allgather_fn"):
        setattr(dscomm, name, counted(getattr(dscomm, name)))

    def gathered(fn):
        received["n"] = 0
        result = fn()
        return received["n"], result

    x = torch.tensor([[5, 6, 7, 8]])
    n_forward, _ = gathered(lambda: m(x))  # the hooks: one forward's gathers
    rows = [[t + b.rank for t in p] for p in PROMPTS]  # every rank its own prompts
    n_once, r = gathered(lambda: sample(m, rows, NEW, 1.0, 1.0, [], 0, torch.Generator().manual_seed(7), b.device,
                                        zero3_offload=offload))
    ref = sample(single, rows, NEW, 1.0, 1.0, [], 0, torch.Generator().manual_seed(7), torch.device("cpu"))
    # rank 1 stops after its first token (every id is a stop), rank 0 decodes all NEW: no rank waits
    stops = list(range(512)) if b.rank == 1 else []
    uneven = sample(m, rows, NEW, 1.0, 1.0, stops, 0, torch.Generator().manual_seed(7), b.device,
                    zero3_offload=offload)
    n_after, _ = gathered(lambda: m(x))  # the hooks are back: a forward gathers as before
    loss = m(x, x)[1]
    b.engine.backward(loss)  # and training runs through them
    b.engine.step()
    n_step, _ = gathered(lambda: generate(m, rows, NEW, temperature=1.0, generator=torch.Generator().manual_seed(7),
                                          device=b.device))
    result = {"rank": b.rank, "total": sum(p.ds_numel for p in m.parameters()),
              "big": sum(p.ds_numel for p in m.parameters() if not p.ds_persist),
              "forward": n_forward, "once": n_once, "after": n_after, "per_step": n_step,
              "same_tokens": bool(torch.equal(r.responses, ref.responses)),
              "max_logprob_diff": float((r.logprobs - ref.logprobs).abs().max()),
              "uneven_lengths": int(uneven.response_mask.sum(1).max()),
              "partitioned_after": all(p.ds_tensor.numel() * 2 == p.ds_numel for p in m.parameters()
                                       if not p.ds_persist and p.ds_numel % 2 == 0)}
    results = [None, None]
    dist.all_gather_object(results, result)
    if b.is_main:
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.barrier()
    b.shutdown()


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    from tests.ports import free_port

    out = tmp_path_factory.mktemp("rl_zero3") / "out.json"
    p = subprocess.run(["deepspeed", "--no_local_rank", "--num_gpus", "2", "--master_port", free_port(),
                        os.path.abspath(__file__), str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_zero3_rollout_gathers_the_parameters_once_per_batch(observed):
    for r in observed:
        assert r["big"] > r["total"] / 2  # most of the model is freed after each forward
        assert r["forward"] >= r["big"]  # one forward through the hooks gathers at least those
        assert r["once"] <= r["total"]  # the whole batch: each parameter at most once
        assert r["per_step"] >= NEW * r["big"]  # the hooks alone: every decoding step gathers again


def test_zero3_rollout_samples_what_one_process_samples(observed):
    for r in observed:
        assert r["same_tokens"], r
        assert r["max_logprob_diff"] < 1e-5, r


def test_ranks_may_stop_decoding_at_different_steps(observed):
    assert [r["uneven_lengths"] for r in observed] == [NEW, 1]


def test_after_a_rollout_the_hooks_gather_around_each_forward_again(observed):
    for r in observed:
        assert r["after"] == r["forward"] > 0
        assert r["partitioned_after"]


if __name__ == "__main__":
    probe(sys.argv[1])
