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


def test_pruning_deletes_off_the_training_thread_and_a_crash_leftover_is_kiln_s_to_remove(tiny_cfg, tmp_path,
                                                                                        monkeypatch):
    """An asynchronous save's commit hands the pruned checkpoint's deletion to a thread:
    the commit returns while the files are still being removed (held here), the pruned
    checkpoint is no longer a checkpoint, and ``wait`` finishes the deletion. What a crash
    mid-deletion leaves (``.pruned-step_N``) is removed by the next start, by exact name."""
    import threading

    from train.checkpoint import store

    b = _trained_backend(tiny_cfg())
    root = str(tmp_path / "ckpt")
    progress = Progress()
    m = CheckpointManager(b, root, "full", keep_last=1, background=True)
    m.track(FilePiece(b.save, b.load), {"progress": progress}, lambda d: None)
    progress.step = 1
    m.start(1, _meta(b))
    m.wait()
    release, rmtree = threading.Event(), store.shutil.rmtree
    monkeypatch.setattr(store.shutil, "rmtree", lambda p, **kw: (release.wait(30), rmtree(p, **kw)))
    progress.step = 2
    m.start(2, _meta(b))
    while (committed := m.poll()) is None:
        pass
    assert committed[0].endswith("step_00000002")
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2]  # step 1 is no checkpoint any more
    assert os.path.isdir(os.path.join(root, ".pruned-step_00000001"))  # its files still being removed
    release.set()
    m.wait()
    assert sorted(os.listdir(root)) == ["latest", "step_00000002"]

    for name in (".pruned-step_00000001", ".pruned-step_1", "pruned-step_00000001", ".pruned-notes"):
        os.makedirs(os.path.join(root, name))
    assert [os.path.basename(p) for p in store.clean_stale(root)] == [".pruned-step_00000001"]
    assert sorted(os.listdir(root)) == [".pruned-notes", ".pruned-step_1", "latest", "pruned-step_00000001",
                                        "step_00000002"]
