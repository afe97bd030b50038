"""Sharded initialisation for real: 2 processes over gloo, started by torchrun (FSDP2) and
deepspeed (ZeRO-3). The model is built without weights (meta device / zero.Init), each rank
initialises its own shard, and the weights the ranks hold together must equal those one
process builds with the same seed -- exactly, since each block of rows has its own seeded
generator. ``init_from`` weights are read by rank 0 and streamed to the shards; they must
arrive unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY
from tests.ports import free_port

COMMON = TINY + ["model.tie_embeddings=true", "model.n_layers=3", "train.seed=11"]


def probe(launcher: str, overrides: list[str], out) -> dict:
    port = free_port()
    starter = {"torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", port],
               "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", port]}[launcher]
    cmd = [*starter, "tests/sharded_init_probe.py", str(out), *COMMON, *overrides]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("launcher,backend,built_as", [
    ("torchrun", ["backend=fsdp"], "meta"),
    ("deepspeed", ["backend=deepspeed", "backend.zero_stage=3"], "partitioned"),
])
def test_sharded_init_builds_no_full_model_and_equals_the_one_process_init(tmp_path, tokenizer_path, launcher,
                                                                            backend, built_as):
    got = probe(launcher, backend + [f"run_dir={tmp_path / 'run'}", f"tokenizer.path={tokenizer_path}"],
                tmp_path / "probe.json")
    assert got["built"][built_as], got["built"]
    assert len(got["max_abs_diff"]) == 3 * 9 + 2  # 9 tensors per block, the (tied) embedding, the final norm
    assert max(got["max_abs_diff"].values()) == 0.0, got["max_abs_diff"]


def test_init_from_is_read_once_and_reaches_every_fsdp_shard_unchanged(tmp_path, tokenizer_path):
    source = tmp_path / "source"
    common = [f"tokenizer.path={tokenizer_path}", "train.max_steps=2", "checkpoint.every=2", "train.eval_every=2"]
    p = subprocess.run([sys.executable, "launch/pretrain.py", *COMMON, *common, f"run_dir={source}"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    got = probe("torchrun", ["backend=fsdp", f"run_dir={tmp_path / 'run'}", f"tokenizer.path={tokenizer_path}",
                             f"init_from={source}"], tmp_path / "probe.json")
    assert got["built"]["meta"]
    assert max(got["max_abs_diff"].values()) == 0.0, got["max_abs_diff"]
    assert got["max_abs_diff_from_fresh_init"] > 1e-4  # trained weights: the comparison above could fail


def test_a_model_built_on_its_device_holds_the_host_built_weights():
    """Single, DDP and ZeRO-1/2 build on the meta device and initialise on the training
    device: the same tensors, bit for bit, as the model built and initialised on the host."""
    import torch

    from model.llama import ModelConfig, Transformer
    from train.sharded_init import build_on_device

    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64,
                      tie_embeddings=True)
    torch.manual_seed(7)
    host = Transformer(cfg)
    torch.manual_seed(7)
    built = build_on_device(Transformer, cfg, torch.device("cpu"))
    assert not any(t.is_meta for t in built.state_dict().values())
    want, got = host.state_dict(), built.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for name in ("rope_cos", "rope_sin"):
        assert torch.equal(getattr(built, name), getattr(host, name))
    assert built.output.weight is built.tok_embeddings.weight  # still tied
    torch.manual_seed(8)
    assert not torch.equal(build_on_device(Transformer, cfg, torch.device("cpu")).layers[0].attn.wq.weight,
                           host.layers[0].attn.wq.weight)
