"""``train.compile=true`` on every backend, counted: how many graphs dynamo compiles and how
many times it breaks one (``torch._dynamo`` counters), for the tiny model's two blocks and
its loss, in one plain process (tests/compile_probe.py, rank 0 of 1) that sets every backend
up as the trainer does.

Expected: one graph for the (identical) blocks and one for the loss, no break, everywhere but
ZeRO-3; under ZeRO-3 the blocks' forward only (its parameter-gathering hooks are
``torch.compiler.disable``d and run around the graph) and an eager loss: one graph, no break,
where compiling the blocks whole gave 36 breaks and 18 graphs (train/compile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.ports import free_port

TOL = 1e-5  # one rank, fp32: compiled kernels reorder sums
ZERO = {stage: ["backend=deepspeed", f"backend.zero_stage={stage}"] for stage in (1, 2, 3)}
BACKENDS = {"single": [], "ddp": ["backend=ddp"], "fsdp": ["backend=fsdp"],
            "zero1": ZERO[1], "zero2": ZERO[2], "zero3": ZERO[3]}
EXPECTED = {"single": (2, 0), "ddp": (2, 0), "fsdp": (2, 0), "zero1": (2, 0), "zero2": (2, 0), "zero3": (1, 0)}


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "probe.json"
    runs = {**{name: (o, True) for name, o in BACKENDS.items()}, "eager": ([], False)}
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=free_port(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "tests/compile_probe.py", str(out), json.dumps(runs)]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(BACKENDS))
def test_compiled_training_has_the_expected_graphs_and_no_graph_break(probed, name):
    got = probed[name]
    assert (got["graphs"], got["breaks"]) == EXPECTED[name], got["reasons"]


def test_eager_training_compiles_nothing(probed):
    assert (probed["eager"]["graphs"], probed["eager"]["breaks"]) == (0, 0)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_compiled_training_gives_the_eager_losses(probed, name):
    for got, want in zip(probed[name]["losses"], probed["eager"]["losses"], strict=True):
        assert abs(got - want) <= TOL, (probed[name]["losses"], probed["eager"]["losses"])
