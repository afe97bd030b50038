"""A start that fails changes nothing on disk, as real launches of launch/pretrain.py show.

Faults defended against: a config error deleting a run directory that holds the user's own
log; a misspelt key next to a ``hydra.*`` override ending in Hydra's traceback (exit 1)
instead of kiln's message (exit 2); a launch that refuses to start (no checkpoint
verifies, exit 3; a resume that changes the model, exit 2) having already rewritten the
run's ``.hydra/`` or anything else in it; a failed start into a new run directory leaving
an empty directory (and its new parents) behind.
"""

from __future__ import annotations

import glob
import os
import shutil

import pytest

from tests.ckpt_helpers import RUN, flip_one_byte, pretrain
from tests.conftest import compose

FAST = [o for o in RUN if not o.startswith(("train.max_steps", "checkpoint.every", "train.eval_every"))] + [
    "train.max_steps=2", "checkpoint.every=1", "train.eval_every=0"]


def snapshot(root) -> dict:
    """Every entry under ``root`` (hidden ones included): kind, bytes, mtime; directories' too."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif os.path.isdir(p):
                out[rel] = ("dir", None, st.st_mtime_ns)
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", f.read(), st.st_mtime_ns)
    out["."] = ("dir", None, os.stat(root).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tokenizer_path):
    """One real run with checkpoints at steps 1 and 2, started with a legitimate hydra.* override."""
    root = tmp_path_factory.mktemp("startup")
    common = FAST + [f"tokenizer.path={tokenizer_path}"]
    run_dir = root / "trained"
    pretrain(*common, f"run_dir={run_dir}", "hydra.job.name=pretrain")
    return {"root": root, "run_dir": run_dir, "common": common}


def copy_of_run(trained, name):
    dst = trained["root"] / name
    shutil.copytree(trained["run_dir"], dst, symlinks=True)
    hydra_dir = dst / ".hydra"
    if not hydra_dir.exists():  # until the trainer records them: what an earlier launch's Hydra wrote
        hydra_dir.mkdir()
        for f in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (hydra_dir / f).write_text(f"# written by the launch that trained this run: {f}\n")
    return dst


def test_a_successful_start_writes_the_config_files_hydra_wrote(trained):
    """kiln, not Hydra, writes .hydra/ now (only once the start succeeded), with Hydra's names and content."""
    hydra_dir = trained["run_dir"] / ".hydra"
    assert sorted(os.listdir(hydra_dir)) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    from omegaconf import OmegaConf

    task = trained["common"] + [f"run_dir={trained['run_dir']}"]
    assert (hydra_dir / "config.yaml").read_text() == OmegaConf.to_yaml(compose(task))
    assert OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")) == task
    hydra = OmegaConf.load(hydra_dir / "hydra.yaml").hydra
    assert "hydra.job.name=pretrain" in hydra.overrides.hydra and list(hydra.overrides.task) == task
    assert hydra.job.name == "pretrain" and hydra.output_subdir is None
    assert not glob.glob(str(hydra_dir / ".*.tmp-*"))


def test_a_config_error_in_a_run_dir_holding_the_users_log_deletes_nothing(tmp_path):
    run_dir = tmp_path / "mine"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "pretrain.log").write_text("my own log of an earlier attempt\n")
    (run_dir / ".hydra" / "config.yaml").write_text("my: notes\n")
    before = snapshot(run_dir)
    p = pretrain(f"run_dir={run_dir}", "optim.lr=-1", ok=False)
    assert p.returncode == 2 and "optim.lr" in p.stderr, p.stderr[-2000:]
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("override, key", [("optim.lrr=1", "optim.lrr"), ("hydra.job.nmae=x", "hydra.job.nmae")])
def test_a_misspelt_key_next_to_a_hydra_override_is_exit_2_naming_the_key(tmp_path, override, key):
    run_dir = tmp_path / "new"
    p = pretrain("hydra.job.name=x", override, f"run_dir={run_dir}", ok=False)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert key in p.stderr and "config error" in p.stderr and "Traceback" not in p.stderr
    assert not run_dir.exists()


def break_every_checkpoint(run_dir):
    for s in glob.glob(str(run_dir / "checkpoints" / "step_*")):
        flip_one_byte(os.path.join(s, "model.safetensors"))


@pytest.mark.parametrize("fault", ["no checkpoint verifies", "resume changes the model"])
def test_a_start_that_fails_changes_nothing_in_the_run_dir(trained, fault):
    run_dir = copy_of_run(trained, fault.replace(" ", "-"))
    if fault == "no checkpoint verifies":
        break_every_checkpoint(run_dir)
        extra, status, says = [], 3, "none verifies"
    else:
        extra, status, says = ["model.n_layers=3"], 2, "model.n_layers"
    before = snapshot(run_dir)
    p = pretrain(*trained["common"], f"run_dir={run_dir}", "train.max_steps=4", *extra, ok=False)
    assert p.returncode == status and says in p.stderr, p.stdout[-2000:] + p.stderr[-2000:]
    after = snapshot(run_dir)
    assert sorted(after) == sorted(before)
    assert {k for k in before if after[k] != before[k]} == set()


@pytest.mark.parametrize("fault", ["config error", "checkpoint error"])
def test_a_start_that_fails_in_a_new_run_dir_leaves_nothing(trained, tmp_path, fault):
    new = tmp_path / "new"
    run_dir = new / "deeper" / "run"
    if fault == "config error":
        args, status = ["optim.lr=-1"], 2
    else:
        broken = copy_of_run(trained, "broken-for-new")
        break_every_checkpoint(broken)
        args, status = [f"resume={broken / 'checkpoints' / 'step_00000002'}"], 3
    p = pretrain(*trained["common"], f"run_dir={run_dir}", *args, ok=False)
    assert p.returncode == status, p.stdout[-2000:] + p.stderr[-2000:]
    assert not new.exists(), sorted(str(p) for p in new.rglob("*"))
    assert os.listdir(tmp_path) == []

