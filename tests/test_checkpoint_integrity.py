"""Checkpoints you can trust: corruption is found by content checksums and the previous good
checkpoint is used (saying so), a run whose checkpoints are all broken refuses to start, and
pickle payloads planted in the formats that pickle (DCP metadata, DeepSpeed state files)
are refused by every reader without being run.

Native checkpoints come from real launches: FSDP in one plain ``python`` process (a process
group of one) and DeepSpeed ZeRO-1 under ``deepspeed --num_gpus 1``.
"""

from __future__ import annotations

import glob
import os
import pickle

import pytest
import torch

from tests.ckpt_helpers import READERS, Payload, flip_one_byte, fresh_copy, launch, pretrain, reader_command, reseal
from train import checkpoint as ckpt

FILES = {
    "weights": ("full", "model.safetensors"),
    "optimizer": ("full", "optimizer.safetensors"),
    "trainer_state": ("full", "trainer_state.json"),
    "dcp_shard": ("dcp", "dcp/__0_0.distcp"),
    "deepspeed_shard": ("deepspeed", "deepspeed/ckpt/*optim_states.pt"),
}


@pytest.mark.parametrize("what", FILES)
def test_one_byte_flip_is_detected_and_the_previous_checkpoint_is_used(runs, what):
    kind, pattern = FILES[what]
    run_dir = fresh_copy(runs, kind, f"flip-{what}")
    step4 = run_dir / "checkpoints" / "step_00000004"
    target = sorted(glob.glob(str(step4 / pattern)))[0]
    size = os.path.getsize(target)
    flip_one_byte(target)
    assert os.path.getsize(target) == size  # same size: only the content checksum can tell
    assert ckpt.verify(str(step4), "size") == []
    problems = ckpt.verify(str(step4))
    assert problems and target in problems[0] and "checksum" in problems[0]

    extra = {"full": [], "dcp": ["backend=fsdp"], "deepspeed": []}[kind]  # ZeRO shards resume in one process
    p = pretrain(*runs["common"], *extra, f"run_dir={run_dir}", "train.max_steps=6")
    out = p.stdout + p.stderr
    assert "skipped 1 newer checkpoint(s) that do not verify" in out and target in out
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in out
    assert os.path.isdir(run_dir / "checkpoints" / "step_00000006")


def test_when_no_checkpoint_verifies_the_run_refuses_to_start_and_changes_nothing(runs):
    run_dir = fresh_copy(runs, "full", "all-broken")
    steps = sorted(glob.glob(str(run_dir / "checkpoints" / "step_*")))
    for s in steps:
        flip_one_byte(os.path.join(s, "model.safetensors"))
    before = {f: open(f, "rb").read() for s in steps for f in glob.glob(os.path.join(s, "*"))}
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", ok=False)
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "none verifies" in p.stderr and all(s in p.stderr for s in steps) and "resume=none" in p.stderr
    assert {f: open(f, "rb").read() for f in before} == before
    assert sorted(glob.glob(str(run_dir / "checkpoints" / "step_*"))) == steps


def test_trainer_state_garbage_names_the_file(runs):
    run_dir = fresh_copy(runs, "full", "garbage-json")
    step4 = run_dir / "checkpoints" / "step_00000004"
    path = step4 / "trainer_state.json"
    path.write_bytes(b"\x00" * os.path.getsize(path))
    reseal(step4)  # the manifest agrees: only parsing can fail
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", ok=False)
    assert p.returncode == 3 and f"{path}: cannot be read as JSON" in p.stderr, p.stderr[-2000:]


def test_stale_temp_files_of_an_interrupted_save_are_removed_at_start(runs):
    run_dir = fresh_copy(runs, "full", "stale")
    root = run_dir / "checkpoints"
    (root / ".tmp-step_00000006").mkdir()
    (root / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"partial")
    (root / ".latest.tmp123").write_text("step_00000006\n")
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=4")
    assert "left by an interrupted save" in p.stdout
    assert not (root / ".tmp-step_00000006").exists() and not (root / ".latest.tmp123").exists()
    assert (root / "step_00000004").is_dir()


@pytest.fixture
def poisoned(runs, tmp_path):
    """A DCP and a DeepSpeed checkpoint, each with a payload planted and the manifest resealed."""
    marker = tmp_path / "payload-ran"
    out = {"marker": marker}
    dcp_run = fresh_copy(runs, "dcp", f"poison-dcp-{tmp_path.name}")
    step = dcp_run / "checkpoints" / "step_00000004"
    (step / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(step)
    out["dcp"] = step
    ds_run = fresh_copy(runs, "deepspeed", f"poison-ds-{tmp_path.name}")
    step = ds_run / "checkpoints" / "step_00000004"
    target = sorted(glob.glob(str(step / "deepspeed" / "ckpt" / "*optim_states.pt")))[0]
    state = torch.load(target, weights_only=False)  # our own, trusted file
    state["extra"] = Payload(marker)
    torch.save(state, target)
    reseal(step)
    out["deepspeed"] = step
    return out


@pytest.mark.parametrize("fmt", ["dcp", "deepspeed"])
# sft.py and score_rewards.py read init weights and checkpoints through the same readers as
# init_from and generate; they face every attack of tests/test_checkpoint_attacks.py.
@pytest.mark.parametrize("reader", [r for r in READERS if r not in ("sft", "score_rewards")])
def test_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(runs, poisoned, reader, fmt, tmp_path):
    step, marker = str(poisoned[fmt]), poisoned["marker"]
    common = runs["common"] + [f"run_dir={tmp_path / 'run'}"]
    p = launch(reader_command(reader, step, common, tmp_path), ok=False)
    assert not marker.exists(), "the payload ran"
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert "refuse" in p.stderr and step in p.stderr and "system" in p.stderr, p.stderr[-2000:]


def test_the_restricted_readers_accept_real_native_checkpoints(runs):
    from train.checkpoint.safe_unpickle import check_deepspeed_files, load_dcp_metadata

    meta = load_dcp_metadata(str(runs["root"] / "dcp" / "checkpoints" / "step_00000004" / "dcp" / ".metadata"))
    assert any(k.startswith("model.") for k in meta.state_dict_metadata)
    files = ckpt.ds_files(str(runs["root"] / "deepspeed" / "checkpoints" / "step_00000004"))
    assert sum(f.endswith(".pt") for f in files) >= 2  # the model and optimizer state files
    check_deepspeed_files(files)
