"""The CheckpointManager holds a run's pieces of state (train/checkpoint/state.py): each
comes back from a checkpoint as it was, no field of trainer_state.json has two owners,
and a field that does not load names itself."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch

from tests.ckpt_helpers import reseal
from train import checkpoint as ckpt
from train.backends import build_backend
from train.checkpoint.manager import CheckpointManager
from train.checkpoint.rng import RNGStates
from train.checkpoint.state import FilePiece, Progress


class Counter:
    """A task's own piece: the manager saves it without knowing what it is."""

    fields = ("counter",)

    def __init__(self, n: int = 0):
        self.n = n

    def state_dict(self) -> dict:
        return {"counter": {"n": self.n}}

    def load_state_dict(self, state: dict) -> None:
        self.n = int(state["counter"]["n"])


def _trained_backend(cfg):
    b = build_backend(cfg)
    torch.manual_seed(0)
    b.setup(torch.nn.Linear(4, 4))
    b.model(torch.randn(2, 4)).square().sum().backward()
    b.step(lr=1e-2, max_norm=1.0)  # AdamW moments to save
    return b


def _manager(b, root, pieces):
    m = CheckpointManager(b, root, "full", keep_last=2, background=False)
    m.track(FilePiece(b.save, b.load), pieces, lambda d: None)
    return m


def _meta(b):
    return {"backend": b.name, "zero_stage": 0, "world_size": 1, "data_parallel_size": 1, "tokens": 96}


def test_every_piece_comes_back_from_a_checkpoint_as_it_was(tiny_cfg, tmp_path):
    b = _trained_backend(tiny_cfg())
    root = str(tmp_path / "ckpt")
    progress, counter = Progress(step=3, tokens=96, skipped_batches={2: 1}), Counter(7)
    m = _manager(b, root, {"progress": progress, "rng": RNGStates(b), "counter": counter})
    random.seed(1)
    torch.manual_seed(1)
    m.start(3, _meta(b))
    path, _ = m.wait()
    weights = {k: v.clone() for k, v in b.raw_model.state_dict().items()}
    moments = {k: {s: t.clone() for s, t in v.items() if torch.is_tensor(t)} for k, v in b.optimizer.state.items()}
    draws = (random.random(), torch.rand(3))

    with torch.no_grad():  # everything moves on
        b.raw_model.weight.add_(1.0)
    b.model(torch.randn(2, 4)).sum().backward()
    b.step(lr=1e-2, max_norm=1.0)
    random.seed(99)
    torch.manual_seed(99)

    progress2, counter2 = Progress(), Counter()
    _manager(b, root, {"progress": progress2, "rng": RNGStates(b), "counter": counter2}).load(path)
    assert progress2 == Progress(step=3, tokens=96, skipped_batches={2: 1})
    assert counter2.n == 7
    for k, v in b.raw_model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in b.optimizer.state.items():
        for s, t in moments[k].items():
            assert torch.equal(v[s], t), (k, s)
    again = (random.random(), torch.rand(3))
    assert again[0] == draws[0] and torch.equal(again[1], draws[1])
    with open(os.path.join(path, ckpt.TRAINER_STATE)) as f:
        assert set(json.load(f)) == {"step", "tokens", "skipped_batches", "rng", "counter"}


def test_a_field_of_trainer_state_has_one_owner(tiny_cfg, tmp_path):
    b = build_backend(tiny_cfg())

    class Steps(Counter):
        fields = ("step",)

    m = CheckpointManager(b, str(tmp_path / "ckpt"), "full", keep_last=2, background=False)
    with pytest.raises(ValueError, match="field 'step' of trainer_state.json has two owners: 'progress' and 'steps'"):
        m.track(FilePiece(b.save, b.load), {"progress": Progress(), "steps": Steps()}, lambda d: None)


def test_a_field_that_does_not_load_is_named(tiny_cfg, tmp_path):
    b = _trained_backend(tiny_cfg())
    root = str(tmp_path / "ckpt")
    m = _manager(b, root, {"progress": Progress(step=2, tokens=64), "counter": Counter(5)})
    m.start(2, _meta(b))
    path, _ = m.wait()
    state_file = os.path.join(path, ckpt.TRAINER_STATE)
    with open(state_file) as f:
        state = json.load(f)
    state["counter"] = {"m": 5}  # the right type, the wrong content: only the piece can tell
    with open(state_file, "w") as f:
        json.dump(state, f)
    reseal(path)  # as a forger would
    with pytest.raises(ckpt.CheckpointError, match=r"trainer_state.json: field 'counter' does not restore into "
                                                  r"rank 0 of this run \(KeyError"):
        _manager(b, root, {"progress": Progress(), "counter": Counter()}).load(path)
