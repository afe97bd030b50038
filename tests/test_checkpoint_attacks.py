"""A checkpoint is exactly the files its manifest lists. Each test is an attack or a fault
on a real checkpoint (FSDP's DCP, DeepSpeed's ZeRO files, kiln's safetensors): a pointer
file added beside the listed files, a DCP bytes entry, a link out of the directory, an
unlisted directory a loader might prefer, manifest paths out of the directory, a forged
trainer state or YAML tag. Every payload's only effect would be to create a marker file,
which must never appear, and every entry point that reads checkpoints refuses with exit 3
and a message naming the file."""

from __future__ import annotations

import glob
import os
import pickle
import shutil
import sys

import pytest
import torch

from tests.ckpt_helpers import (
    READERS,
    Payload,
    flip_one_byte,
    fresh_copy,
    launch,
    pretrain,
    reader_command,
    reseal,
)
from tests.ports import free_port
from train import checkpoint as ckpt


def plant_pointer(step, outside, marker) -> None:
    """No forging at all: one small text file, DeepSpeed's ``latest``, added to a verified
    safetensors checkpoint and naming a directory elsewhere whose state files carry a payload."""
    tag_dir = outside / "evil"
    tag_dir.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": {}, "payload": Payload(marker)}, tag_dir / name)
    (step / "deepspeed").mkdir()
    (step / "deepspeed" / "latest").write_text(str(tag_dir))


def plant_dcp_bytes(step, marker) -> None:
    """A forger's DCP metadata made only of allowed classes, in which a parameter is a bytes
    entry stored in another file: DCP's default planner would unpickle it unchecked."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from train.checkpoint.safe_unpickle import load_dcp_metadata

    meta_path = step / "dcp" / ".metadata"
    meta = load_dcp_metadata(str(meta_path))
    key = next(k for k in meta.state_dict_metadata if k.startswith("model.") and "tok_emb" in k)
    payload = pickle.dumps(Payload(marker))
    (step / "dcp" / "payload.distcp").write_bytes(payload)
    meta.state_dict_metadata[key] = BytesStorageMetadata()
    meta.storage_data = {k: v for k, v in meta.storage_data.items() if k.fqn != key}
    meta.storage_data[MetadataIndex(key)] = _StorageInfo("payload.distcp", 0, len(payload))
    meta_path.write_bytes(pickle.dumps(meta))
    reseal(step)


def plant_linked_tag(step, outside, marker) -> None:
    """DeepSpeed's tag directory replaced by a link to a copy elsewhere that carries a payload."""
    tag = step / "deepspeed" / "ckpt"
    shutil.copytree(tag, outside / "ckpt")
    target = sorted(glob.glob(str(outside / "ckpt" / "*optim_states.pt")))[0]
    state = torch.load(target, weights_only=False)  # our own, trusted file
    state["payload"] = Payload(marker)
    torch.save(state, target)
    shutil.rmtree(tag)
    os.symlink(outside / "ckpt", tag)


def plant_unvetted_ds_file(step, marker) -> None:
    """A forger's extra DeepSpeed model file without the .pt suffix, listed in the manifest:
    DeepSpeed's converter finds model files by name prefix and unpickles them unchecked."""
    (step / "deepspeed" / "ckpt" / "mp_rank_01_model_states").write_bytes(pickle.dumps(Payload(marker)))
    reseal(step)


ATTACKS = {"pointer": "full", "dcp_bytes": "dcp", "linked_tag": "deepspeed", "ds_unvetted": "deepspeed"}
SAYS = {"pointer": "not in the manifest", "dcp_bytes": "not a tensor", "linked_tag": "symbolic link",
        "ds_unvetted": "is not a file DeepSpeed writes"}


@pytest.fixture
def attacked(runs, tmp_path, request):
    kind = request.param
    marker = tmp_path / "payload-ran"
    run_dir = fresh_copy(runs, ATTACKS[kind], f"attack-{kind}-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    outside = tmp_path / "outside"
    outside.mkdir()
    {"pointer": lambda: plant_pointer(step, outside, marker), "dcp_bytes": lambda: plant_dcp_bytes(step, marker),
     "linked_tag": lambda: plant_linked_tag(step, outside, marker),
     "ds_unvetted": lambda: plant_unvetted_ds_file(step, marker)}[kind]()
    return kind, step, marker




@pytest.mark.parametrize("attacked", list(ATTACKS), indirect=True)
@pytest.mark.parametrize("reader", READERS)
def test_an_attacked_checkpoint_is_refused_by_every_reader_and_no_payload_runs(runs, attacked, reader, tmp_path):
    kind, step, marker = attacked
    step = str(step)
    common = runs["common"] + [f"run_dir={tmp_path / 'run'}"]
    # checkpoint.verify=off skips sizes and checksums, never the structure
    resume_extra = ["checkpoint.verify=off", *(["backend=fsdp"] if kind == "dcp_bytes" else [])]
    p = launch(reader_command(reader, step, common, tmp_path, resume_extra), ok=False)
    assert not marker.exists(), "the payload ran"
    assert p.returncode == 3, p.stdout[-2000:] + p.stderr[-2000:]
    assert SAYS[kind] in p.stderr and step in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize("attacked", ["pointer"], indirect=True)
def test_resume_auto_skips_a_checkpoint_with_an_added_pointer_file_and_the_payload_never_runs(runs, attacked):
    _, step, marker = attacked
    run_dir = step.parent.parent
    assert f"{step}/deepspeed: directory not in the manifest" in ckpt.verify(str(step))[0]
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6")
    assert not marker.exists()
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in p.stdout + p.stderr


@pytest.mark.parametrize("attacked", ["linked_tag"], indirect=True)
def test_native_zero_resume_refuses_a_linked_tag_directory(runs, attacked, tmp_path):

    _, step, marker = attacked
    port = free_port()
    p = pretrain(*runs["common"], f"run_dir={tmp_path / 'z'}", f"resume={step}", "train.max_steps=6",
                 "backend=deepspeed", "backend.zero_stage=1",
                 launcher=("deepspeed", "--num_gpus", "1", "--master_port", port), ok=False)
    assert not marker.exists(), "the payload ran"
    assert p.returncode != 0 and "symbolic link" in p.stdout + p.stderr


def test_an_unlisted_dcp_directory_is_never_preferred_over_the_listed_weights(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"unlisted-dcp-{tmp_path.name}")
    step2 = run_dir / "checkpoints" / "step_00000002"
    shutil.copytree(runs["root"] / "dcp" / "checkpoints" / "step_00000004" / "dcp", step2 / "dcp")
    (step2 / "chat_template.jinja").write_text("{{ evil }}")
    problems = ckpt.verify(str(step2), "off")
    assert any(f"{step2}/dcp: directory not in the manifest" in p for p in problems)
    assert any(f"{step2}/chat_template.jinja: not in the manifest" in p for p in problems)
    p = launch([sys.executable, "launch/export_hf.py", str(step2), str(tmp_path / "hf")], ok=False)
    assert p.returncode == 3 and "not in the manifest" in p.stderr
    assert not (tmp_path / "hf").exists()


def test_manifest_entries_out_of_the_directory_are_refused_without_being_opened(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"escape-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 10)
    meta = ckpt.read_meta(str(step))
    meta["files"]["../../../" + os.path.relpath(secret, run_dir.parent)] = {"size": 10}
    meta["files"][str(secret)] = {"size": 10}
    ckpt.write_json_atomic(str(step / ckpt.META), meta)
    problems = ckpt.verify(str(step))
    assert sum("leaves the checkpoint directory" in p or "is absolute" in p for p in problems) == 2
    p = launch([sys.executable, "launch/generate.py", str(step), "--prompt", "Hi", "--max-new-tokens", "2"], ok=False)
    assert p.returncode == 3 and "manifest entry" in p.stderr


def test_links_anywhere_in_a_checkpoint_are_refused(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"links-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    outside = tmp_path / "weights.safetensors"
    shutil.move(step / "model.safetensors", outside)
    os.symlink(outside, step / "model.safetensors")  # same bytes: sizes and checksums still match
    assert any("model.safetensors: is a symbolic link" in p for p in ckpt.verify(str(step)))
    linked_step = run_dir / "checkpoints" / "step_00000010"
    os.symlink(step, linked_step)
    assert ckpt.verify(str(linked_step), "off") and "symbolic link" in ckpt.verify(str(linked_step), "off")[0]
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", ok=True)
    assert f"resumed from {run_dir}/checkpoints/step_00000002 at step 2" in p.stdout + p.stderr
    assert os.path.islink(linked_step) and os.path.exists(outside)  # pruning never follows or removes links


@pytest.mark.parametrize("field,value,says", [("step", -1000, "'step' must be a non-negative integer"),
                                              ("step", "ten", "'step' must be a non-negative integer"),
                                              ("step", 7, "but meta.json says 4"),
                                              ("tokens", -1, "'tokens' must be a non-negative integer"),
                                              ("skipped_batches", {"x": 1}, "'skipped_batches'"),
                                              ("data", [5], "field 'data' does not restore")])
def test_a_forged_trainer_state_is_refused_naming_the_file_and_field(runs, tmp_path, field, value, says):
    import json

    run_dir = fresh_copy(runs, "full", f"state-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    path = step / ckpt.TRAINER_STATE
    state = json.loads(path.read_text())
    state[field] = value
    path.write_text(json.dumps(state))
    reseal(step)  # the manifest agrees, as a forger would make it
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", ok=False)
    assert p.returncode == 3 and f"{path}: field" in p.stderr and says in p.stderr, p.stderr[-2000:]
    assert not glob.glob(str(run_dir / "checkpoints" / "step_-*"))


def test_a_python_yaml_tag_is_a_named_checkpoint_error_and_never_runs(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"yaml-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    marker = tmp_path / "yaml-ran"
    (step / ckpt.MODEL_CONFIG).write_text(f'd_model: !!python/object/apply:os.system ["touch {marker}"]\n')
    reseal(step)
    p = launch([sys.executable, "launch/generate.py", str(step), "--prompt", "Hi", "--max-new-tokens", "2"], ok=False)
    assert not marker.exists()
    assert p.returncode == 3 and f"{step / ckpt.MODEL_CONFIG}: cannot be read" in p.stderr, p.stderr[-2000:]


def test_pruning_keeps_the_good_checkpoints_when_the_newest_is_corrupt(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"prune-{tmp_path.name}")
    root = run_dir / "checkpoints"
    flip_one_byte(root / "step_00000004" / "model.safetensors")  # same size: only a checksum tells
    pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", "checkpoint.every=3",
             "checkpoint.keep_last=1")
    left = [s for s, _ in ckpt.list_checkpoints(str(root))]
    assert left == [4, 6]  # the broken one is kept as evidence, never counted as one of keep_last
    assert ckpt.verify(str(root / "step_00000006")) == [] and ckpt.verify(str(root / "step_00000004"))
    assert (root / "latest").read_text().strip() == "step_00000006"
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", "checkpoint.every=3")
    assert "already at step 6" in p.stdout


def test_start_up_removes_only_the_temp_names_kiln_creates(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"mine-{tmp_path.name}")
    root = run_dir / "checkpoints"
    shutil.copytree(root / "step_00000002", root / "step_00000002.old")  # a user's backup
    (root / "step_00000002.old.notes").write_text("mine")
    (root / ".tmp-step_00000006").mkdir()
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=4")
    assert (root / "step_00000002.old" / "model.safetensors").is_file()
    assert (root / "step_00000002.old.notes").read_text() == "mine"
    assert not (root / ".tmp-step_00000006").exists() and "left by an interrupted save" in p.stdout


def test_step_numbers_past_eight_digits_are_resumed_and_pruned(tmp_path):
    root = str(tmp_path)

    def fake(step):
        tmp = ckpt.begin(root, step)
        (tmp_path / os.path.basename(tmp) / "model.safetensors").write_bytes(b"x" * 10)
        return ckpt.commit(root, tmp, step, {"backend": "single"}, keep_last=2)

    fake(99_999_999)
    fake(100_000_000)
    newest = fake(100_000_001)
    assert os.path.basename(newest) == "step_100000001"
    assert ckpt.find_latest(root) == newest
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [100_000_000, 100_000_001]
    os.makedirs(os.path.join(root, "step_0100000002"))  # not a canonical name: never a checkpoint
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [100_000_000, 100_000_001]


@pytest.mark.parametrize("override,key", [("data.seq_len=16", "data.seq_len"),
                                          ("train.virtual_shards=4", "train.virtual_shards"),
                                          ("train.data_sharding=sequences", "train.data_sharding"),
                                          ("model.d_model=32", "model.d_model")])
def test_a_resume_that_changes_what_the_saved_state_means_is_a_config_error(runs, tmp_path, override, key):
    run_dir = fresh_copy(runs, "full", f"changed-{tmp_path.name}")
    before = sorted(glob.glob(str(run_dir / "checkpoints" / "*")))
    p = pretrain(*runs["common"], f"run_dir={run_dir}", "train.max_steps=6", override, ok=False)
    assert p.returncode == 2 and f"config error: {key}" in p.stderr, p.stdout[-1500:] + p.stderr[-1500:]
    assert "Traceback" not in p.stderr
    assert sorted(glob.glob(str(run_dir / "checkpoints" / "*"))) == before


def test_init_from_honours_checkpoint_verify_and_records_the_digest(runs, tmp_path):
    import json

    run_dir = fresh_copy(runs, "full", f"init-verify-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    flip_one_byte(step / "model.safetensors")  # same size: only the checksum tells
    common = runs["common"] + ["train.max_steps=1"]
    p = pretrain(*common, f"run_dir={tmp_path / 'full'}", f"init_from={step}", ok=False)
    assert p.returncode == 3 and "content checksum differs" in p.stderr, p.stderr[-2000:]
    pretrain(*common, f"run_dir={tmp_path / 'size'}", f"init_from={step}", "checkpoint.verify=size")
    with open(tmp_path / "size" / "metrics.jsonl") as f:
        run = next(r for r in map(json.loads, f) if r["kind"] == "run")
    assert run["path"] == str(step) and run["digest"] == ckpt.digest(str(step))


def test_a_fifo_or_link_for_meta_json_is_refused_without_blocking(runs, tmp_path):
    import subprocess

    run_dir = fresh_copy(runs, "full", f"fifo-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    os.remove(step / ckpt.META)
    os.mkfifo(step / ckpt.META)  # opening it for reading would wait for a writer for ever
    code = f"from train import checkpoint as c; print(c.verify({str(step)!r}, 'off'))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0 and "not a regular file" in p.stdout, p.stdout + p.stderr


def test_a_yaml_tag_in_the_run_config_is_a_checkpoint_error_for_evaluate(runs, tmp_path):
    run_dir = fresh_copy(runs, "full", f"cfg-yaml-{tmp_path.name}")
    step = run_dir / "checkpoints" / "step_00000004"
    marker = tmp_path / "cfg-yaml-ran"
    with open(step / ckpt.CONFIG, "a") as f:
        f.write(f'evil: !!python/object/apply:os.system ["touch {marker}"]\n')
    reseal(step)
    p = launch([sys.executable, "launch/evaluate.py", str(step)], ok=False)
    assert not marker.exists()
    assert p.returncode == 3 and f"{step / ckpt.CONFIG}: cannot be read" in p.stderr, p.stderr[-2000:]
