import json
import os

import pytest

from train import checkpoint as ckpt
from train.trainer import Trainer


class StopAt(Trainer):
    """A trainer interrupted after ``stop_at`` steps, as a preempted job would be."""

    stop_at = None

    def should_stop(self):
        return self.state.step == self.stop_at


def run(cfg, stop_at=None):
    t = StopAt(cfg)
    t.stop_at = stop_at
    return t, t.fit()


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_cfg, tmp_path):
    common = ["train.max_steps=20", "checkpoint.every=100", "train.eval_every=5"]
    _, straight = run(tiny_cfg(*common, f"run_dir={tmp_path / 'a'}"))
    _, first = run(tiny_cfg(*common, f"run_dir={tmp_path / 'b'}"), stop_at=10)
    assert first["final_step"] == 10
    trainer, second = run(tiny_cfg(*common, f"run_dir={tmp_path / 'b'}"))
    assert second["resumed_from"].endswith("step_00000010") and second["start_step"] == 10
    resumed = {**first["losses"], **second["losses"]}
    assert sorted(resumed) == list(range(1, 21))
    # Same data order, optimizer state, RNG and schedule: bitwise-identical losses on CPU.
    assert resumed == straight["losses"]
    assert second["val_losses"][20] == straight["val_losses"][20]
    assert straight["losses"][20] < straight["losses"][1]


def test_checkpoint_holds_everything_needed_to_continue(tiny_cfg, tmp_path):
    trainer, _ = run(tiny_cfg("train.max_steps=3", "checkpoint.every=3", "train.eval_every=0"))
    path = ckpt.find_latest(trainer.ckpt_root)
    names = set(os.listdir(path))
    assert {"model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.yaml", "tokenizer.model",
            "meta.json", "model_config.yaml"} <= names
    state = ckpt.read_trainer_state(path)
    assert state["step"] == 3 and state["tokens"] == 3 * 4 * 32
    shards = state["data"][0]["stream"]["shards"]  # train.data_sharding=shards: each virtual shard once
    assert sorted(shards, key=int) == [str(v) for v in range(8)]
    assert shards["0"]["docs"]["reader"]["position"] is not None
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])
    # Safe loading: weights and AdamW moments are safetensors, keyed by parameter name.
    from safetensors.torch import load_file

    moments = load_file(os.path.join(path, "optimizer.safetensors"))
    assert "layers.0.attn.wq.weight.exp_avg" in moments and "layers.0.attn.wq.weight.exp_avg_sq" in moments


def test_keep_last_prunes_old_checkpoints(tiny_cfg):
    trainer, _ = run(tiny_cfg("train.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2",
                              "train.eval_every=0"))
    assert [s for s, _ in ckpt.list_checkpoints(trainer.ckpt_root)] == [6, 8]


def make_fake_checkpoint(root, step):
    tmp = ckpt.begin(root, step)
    with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
        f.write(b"x" * 100)
    return ckpt.commit(root, tmp, step, {"backend": "single"}, keep_last=10)


def test_truncated_checkpoint_is_never_picked_by_resume_auto(tmp_path):
    root = str(tmp_path)
    make_fake_checkpoint(root, 10)
    newest = make_fake_checkpoint(root, 20)
    assert ckpt.find_latest(root) == newest
    with open(os.path.join(newest, "model.safetensors"), "r+b") as f:  # a partial write
        f.truncate(50)
    assert ckpt.find_latest(root).endswith("step_00000010")
    os.remove(os.path.join(root, "step_00000010", "meta.json"))  # no manifest at all
    assert ckpt.find_latest(root) is None


def test_directory_without_manifest_or_left_in_temp_is_ignored(tmp_path):
    root = str(tmp_path)
    good = make_fake_checkpoint(root, 10)
    os.makedirs(os.path.join(root, "step_00000030"))  # crashed before meta.json
    with open(os.path.join(root, "step_00000030", "model.safetensors"), "wb") as f:
        f.write(b"y")
    ckpt.begin(root, 40)  # crashed while writing: only the temp dir exists
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000030\n")  # even if the pointer names it
    assert ckpt.find_latest(root) == good


def test_meta_claiming_incomplete_is_rejected(tmp_path):
    path = make_fake_checkpoint(str(tmp_path), 5)
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["complete"] = False
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    assert not ckpt.is_complete(path)


def test_crash_during_save_leaves_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    trainer, _ = run(tiny_cfg("train.max_steps=2", "checkpoint.every=2", "train.eval_every=0"))
    good = ckpt.find_latest(trainer.ckpt_root)

    def boom(directory, background=False):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer.backend, "save", boom)
    trainer.state.step = 4
    with pytest.raises(OSError):
        trainer.save()
    assert ckpt.find_latest(trainer.ckpt_root) == good
    assert ckpt.is_complete(good)


def test_finished_run_is_not_retrained(tiny_cfg):
    run(tiny_cfg("train.max_steps=2", "checkpoint.every=2", "train.eval_every=0"))
    _, again = run(tiny_cfg("train.max_steps=2", "checkpoint.every=2", "train.eval_every=0"))
    assert again["start_step"] == 2 and again["losses"] == {}


def test_a_background_write_that_fails_is_reported_and_leaves_the_last_good_checkpoint(tiny_cfg, monkeypatch):
    from train.checkpoint.full_state import FullState

    trainer, _ = run(tiny_cfg("train.max_steps=2", "checkpoint.every=2", "checkpoint.async_save=true"))
    good = ckpt.find_latest(trainer.ckpt_root)

    def full_disk(self, directory, *args, **kwargs):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(FullState, "save", full_disk)
    trainer.state.step = 4
    assert trainer.save() is None  # returns once the state is copied; the write fails in the background
    with pytest.raises(ckpt.CheckpointError, match="step 4 could not be written.*disk full"):
        trainer.finish_save()
    assert ckpt.find_latest(trainer.ckpt_root) == good and trainer.last_checkpoint == good
    assert ckpt.verify(good) == []
