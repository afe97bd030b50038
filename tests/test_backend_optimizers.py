"""What each backend's optimizer actually holds and does, read back after ``backend.setup``:
one plain process (tests/backend_optimizers_probe.py, rank 0 of 1) sets up every backend on the
same tiny model, as the trainer builds it (FSDP on the meta device, ZeRO-3 under
``zero.Init``, where even one rank holds empty 1-D partitions), and trains three steps.

Weight decay is 20 at lr 1e-2: each step shrinks the decayed matrices by a fifth, which
moves the third loss by about 0.1, so a backend that decays other parameters, or none,
cannot match single's losses (compared to 1e-5; one rank, fp32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.ports import free_port

TOL = 1e-5
DECAY = ["optim.weight_decay=20"]
ZERO = {stage: ["backend=deepspeed", f"backend.zero_stage={stage}"] for stage in (1, 2, 3)}
BACKENDS = {"single": [], "ddp": ["backend=ddp"], "fsdp": ["backend=fsdp"],
            "zero1": ZERO[1], "zero2": ZERO[2], "zero3": ZERO[3]}
RUNS = {
    **{name: overrides + DECAY for name, overrides in BACKENDS.items()},
    "single_no_decay": ["optim.weight_decay=0"],
    "zero3_no_decay": ZERO[3] + ["optim.weight_decay=0"],
    **{f"zero{stage}_bf16": ZERO[stage] + ["train.precision=bf16"] for stage in (1, 2, 3)},
}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "probe.json"
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=free_port(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "tests/backend_optimizers_probe.py", str(out), json.dumps(RUNS)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


def test_single_decays_the_matrices_and_not_the_embedding_or_norm_gains(probed):
    (wd, decayed), (no_wd, kept) = probed["single"]["groups"]
    assert (wd, no_wd) == (20.0, 0.0)
    assert decayed == sorted(f"layers.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3"))
    assert set(kept) == {"tok_embeddings.weight", "norm.weight"} | {
        f"layers.{i}.{norm}.weight" for i in range(2) for norm in ("attn_norm", "mlp_norm")}


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "single"])
def test_every_backend_decays_the_same_parameter_names_as_single(probed, name):
    assert probed[name]["groups"] == probed["single"]["groups"]


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "single"])
def test_every_backend_trains_like_single_under_a_large_weight_decay(probed, name):
    got, want = probed[name]["losses"], probed["single"]["losses"]
    assert all(abs(a - b) <= TOL for a, b in zip(got, want)), (got, want)


def test_a_large_weight_decay_changes_zero3_losses_as_it_changes_singles(probed):
    def effect(prefix):
        return probed[prefix]["losses"][-1] - probed[f"{prefix}_no_decay"]["losses"][-1]

    assert abs(effect("single")) > 100 * TOL  # the decay is visible in three steps
    assert abs(effect("zero3") - effect("single")) <= 2 * TOL


@pytest.mark.parametrize("name", list(RUNS))
def test_step_returns_the_gradient_norm_as_a_tensor_not_a_host_float(probed, name):
    assert probed[name]["norm_type"] == "Tensor"


@pytest.mark.parametrize("name", [n for n in BACKENDS if n != "single"])
def test_the_returned_gradient_norm_is_singles(probed, name):
    got, want = probed[name]["norm"], probed["single"]["norm"]
    assert want > 0 and abs(got - want) <= 1e-4 * want, (got, want)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_under_bf16_reduces_and_accumulates_gradients_in_fp32(probed, stage):
    got = probed[f"zero{stage}_bf16"]
    assert (got["comm_dtype"], got["accum_dtype"]) == ("torch.float32", "torch.float32"), got
    # ZeRO-1 with fp32 accumulation is DeepSpeed's BF16_Optimizer; it must still train.
    assert got["losses"][-1] < got["losses"][0]
