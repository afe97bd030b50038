"""A non-finite loss: ``train.nan_policy=raise`` stops and says which checkpoint is the
source; ``rollback`` reloads the last checkpoint, skips the poisoned global batch for good
(the skip travels in later checkpoints) and finishes the run."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from train.trainer import Trainer


def batch_key(micro_batches) -> str:
    return hashlib.blake2b(b"".join(mb["input"].numpy().tobytes() for mb in micro_batches)).hexdigest()


class Poisoned(Trainer):
    """Trains normally, but a global batch whose key is in ``poison`` turns a weight into NaN
    first, so the loss, the gradients and the updated weights really are NaN."""

    poison: set = set()
    stop_at = None

    def forward_backward(self, micro_batches):
        key = batch_key(micro_batches)
        self.seen.append((self.state.step + 1, key))
        if key in self.poison:
            with torch.no_grad():
                self.backend.raw_model.norm.weight[0] = float("nan")
        return super().forward_backward(micro_batches)

    def should_stop(self):
        return self.state.step == self.stop_at or super().should_stop()


def run(cfg, poison=(), stop_at=None):
    t = Poisoned(cfg)
    t.seen, t.poison, t.stop_at = [], set(poison), stop_at
    return t, t.fit()


COMMON = ["train.max_steps=10", "checkpoint.every=4", "checkpoint.keep_last=5", "train.eval_every=5"]


@pytest.fixture
def straight(tiny_cfg, tmp_path):
    trainer, result = run(tiny_cfg(*COMMON, f"run_dir={tmp_path / 'straight'}"))
    return dict(trainer.seen), result


def test_raise_policy_stops_naming_the_checkpoint_the_stretch_started_from(tiny_cfg, tmp_path, straight):
    keys, _ = straight
    with pytest.raises(FloatingPointError) as e:
        run(tiny_cfg(*COMMON, f"run_dir={tmp_path / 'r'}"), poison=[keys[6]])
    msg = str(e.value)
    assert "loss is nan at step 6" in msg and "train.nan_policy=rollback" in msg
    assert str(tmp_path / "r" / "checkpoints" / "step_00000004") in msg


@pytest.mark.parametrize("log_every", [1, 4])  # 4: losses are read at step 8, two steps after the NaN
def test_rollback_skips_the_poisoned_batch_and_the_run_finishes(tiny_cfg, tmp_path, straight, capsys, log_every):
    keys, ref = straight
    run_dir = tmp_path / "rb"
    trainer, result = run(tiny_cfg(*COMMON, "train.nan_policy=rollback", f"run_dir={run_dir}",
                                   f"train.log_every={log_every}"), poison=[keys[6]])
    assert "rolled back to" in capsys.readouterr().out
    assert result["final_step"] == 10 and trainer.rollbacks == 1
    assert all(v == v for v in result["losses"].values())  # no NaN left
    for s in range(1, 6):  # before the poison, and the replayed step 5: exactly the straight run
        assert result["losses"][s] == ref["losses"][s]
    # The poisoned batch was trained on once (step 6), then skipped: step 6 trains on the batch that
    # came next in the stream, which the straight run used at step 7.
    steps = [s for s, k in trainer.seen if k == keys[6]]
    assert steps == [6] and (6, keys[7]) in trainer.seen
    with open(run_dir / "checkpoints" / "step_00000008" / "trainer_state.json") as f:
        assert json.load(f)["skipped_batches"] == {"6": 1}


def test_an_interrupted_run_with_a_poisoned_batch_ends_as_the_uninterrupted_one(tiny_cfg, tmp_path, straight):
    keys, _ = straight
    cfg = [*COMMON, "train.nan_policy=rollback"]
    _, whole = run(tiny_cfg(*cfg, f"run_dir={tmp_path / 'whole'}"), poison=[keys[6]])
    run_dir = tmp_path / "parts"
    _, first = run(tiny_cfg(*cfg, f"run_dir={run_dir}"), poison=[keys[6]], stop_at=5)  # preempted at 5
    assert first["final_step"] == 5
    again, resumed = run(tiny_cfg(*cfg, f"run_dir={run_dir}"), poison=[keys[6]])
    assert again.rollbacks == 1 and resumed["start_step"] == 5  # rolled back to the step-5 checkpoint
    assert all(resumed["losses"][s] == whole["losses"][s] for s in range(6, 11)), (resumed, whole)
    with open(run_dir / "checkpoints" / "step_00000010" / "trainer_state.json") as f:
        assert json.load(f)["skipped_batches"] == {"6": 1}
