"""What refers to a checkpoint knows which checkpoint it was (``checkpoint.digest``), so a
checkpoint retrained at the same path is never mistaken for the old one:

- the DPO reference cache stores the starting checkpoint's digest: a cache written for the
  base before it was retrained is recomputed (stale reference log-probs would make step 0's
  loss and margin other than ln 2 and 0), one written for the same base is read;
- an adapter checkpoint stores its base's digest: merge_lora.py and generate.py refuse a
  base retrained since, and an adapter_config.json without a digest, with exit status 3 and
  a message naming both digests, and run as before on the unchanged base.

Each base here is this module's own (other modules share theirs), retrained in place by
removing its run directory and training it again with another seed."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY, compose
from tests.sft_helpers import chat_file, sft_cfg, write_jsonl
from tests.test_dpo import PREFS, dpo, metrics
from train import checkpoint as ckpt

ENV = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
ONE_STEP = ["train.max_steps=1", "train.eval_every=1", "checkpoint.every=1", "train.micro_batch_size=4"]


def train_base(run_dir, tokenizer_path, seed: int) -> str:
    """A 2-step tiny pretraining run at ``run_dir`` (whatever was there before is removed):
    the same path, other bytes when the seed differs."""
    from train.trainer import Trainer

    shutil.rmtree(run_dir, ignore_errors=True)
    Trainer(compose(TINY + [f"run_dir={run_dir}", f"tokenizer.path={tokenizer_path}", "train.max_steps=2",
                            "checkpoint.every=2", f"train.seed={seed}"])).fit()
    return str(run_dir)


def step_dir(run_dir) -> str:
    return ckpt.resolve(str(run_dir))


def launch_all(**commands) -> dict[str, subprocess.CompletedProcess]:
    """Run the independent launcher commands side by side (the 2 cores each start one)."""
    procs = {k: subprocess.Popen([sys.executable, *map(str, a)], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=ENV) for k, a in commands.items()}
    done = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        done[k] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


# -- the DPO reference cache ---------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, tokenizer_path):
    """Three one-step DPO launches sharing one cache: on the base, again on the same base,
    then on the base retrained at the same path."""
    tmp = tmp_path_factory.mktemp("identity_dpo")
    rows = [json.loads(line) for line in open(PREFS)][:24]
    pairs = write_jsonl(tmp / "pairs.jsonl", rows)
    base, cache = train_base(tmp / "base", tokenizer_path, seed=1337), tmp / "ref.json"
    old = ckpt.digest(step_dir(base))
    runs = {"first": dpo(tmp / "first", base, pairs, *ONE_STEP, f"dpo.reference_cache={cache}")}
    runs["same"] = dpo(tmp / "same", base, pairs, *ONE_STEP, f"dpo.reference_cache={cache}")
    stored_before = json.load(open(cache))
    train_base(base, tokenizer_path, seed=7)
    new = ckpt.digest(step_dir(base))
    runs["retrained"] = dpo(tmp / "retrained", base, pairs, *ONE_STEP, f"dpo.reference_cache={cache}")
    return {"tmp": tmp, "cache": cache, "old": old, "new": new, "out": runs, "stored_before": stored_before,
            "stored_after": json.load(open(cache))}


def test_dpo_cache_written_for_a_base_since_retrained_at_the_same_path_is_recomputed(dpo_runs):
    r = dpo_runs
    assert r["old"] != r["new"]  # the same path, other bytes
    out = r["out"]["retrained"]
    assert "reference log-probs read from" not in out
    line = next(x for x in out.splitlines() if "dpo.reference_cache=" in x and "not used" in x)
    assert r["old"] in line and r["new"] in line, line
    # The fresh reference: the step-0 policy is its own reference (stale log-probs gave 0.635, margin 0.119).
    ev = metrics(r["tmp"] / "retrained", "eval")
    assert ev[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(ev[0]["reward_margin"]) < 1e-4
    # and the cache now holds the retrained base's log-probs under its digest
    assert r["stored_before"]["init_digest"] == r["old"] and r["stored_after"]["init_digest"] == r["new"]
    assert r["stored_after"]["ref"] != r["stored_before"]["ref"]


def test_dpo_cache_written_for_the_unchanged_base_is_read(dpo_runs):
    r = dpo_runs
    assert "reference log-probs read from" not in r["out"]["first"]  # nothing to read yet: computed, written
    out = r["out"]["same"]
    assert f"reference log-probs read from {r['cache']}" in out and r["old"] in out
    ev = metrics(r["tmp"] / "same", "eval")
    assert ev[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert metrics(r["tmp"] / "same", "train")[1]["loss"] == metrics(r["tmp"] / "first", "train")[1]["loss"]


# -- an adapter's base ----------------------------------------------------------------------

def strip_base_digest(src, dst) -> str:
    """A copy of the adapter checkpoint ``src`` as kiln wrote it before base_digest existed
    (adapter_config.json without it, the manifest resealed over the edit)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, ckpt.ADAPTER_CONFIG)
    cfg = json.load(open(path))
    del cfg["base_digest"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=1)
    meta = ckpt.read_meta(str(dst))
    meta["files"] = ckpt.manifest(str(dst))
    ckpt.write_json_atomic(os.path.join(dst, ckpt.META), meta)
    return str(dst)


def generate(path) -> list:
    return ["launch/generate.py", path, "--prompt", "What is a list?", "--chat", "--temperature", "0", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def adapter_runs(tmp_path_factory, tokenizer_path):
    """An adapter trained on a base; merge_lora.py and generate.py on it while the base is
    unchanged, on a copy without base_digest, then after the base is retrained in place."""
    from train.sft.trainer import SFTTrainer

    tmp = tmp_path_factory.mktemp("identity_lora")
    base = train_base(tmp / "base", tokenizer_path, seed=1337)
    SFTTrainer(sft_cfg(tmp / "lora", base, [chat_file(tmp, 8)], "lora.enabled=true", "lora.rank=4",
                       "train.max_steps=1", "checkpoint.every=1")).fit()
    adapter = step_dir(tmp / "lora")
    old_style = strip_base_digest(adapter, tmp / "old_style")
    r = {"tmp": tmp, "base": step_dir(base), "adapter": adapter, "old_style": old_style,
         "config": json.load(open(os.path.join(adapter, ckpt.ADAPTER_CONFIG))), "old": ckpt.digest(step_dir(base))}
    merge = "launch/merge_lora.py"
    r.update(launch_all(merge_same=[merge, adapter, tmp / "merged_same"], generate_same=generate(adapter),
                        merge_old_style=[merge, old_style, tmp / "merged_old_style"],
                        merge_old_style_accepted=[merge, old_style, tmp / "merged_accepted", "--accept-base"]))
    train_base(base, tokenizer_path, seed=7)
    r["new"] = ckpt.digest(step_dir(base))
    r.update(launch_all(merge_retrained=[merge, adapter, tmp / "merged_retrained"], generate_retrained=generate(adapter)))
    return r


def test_adapter_records_its_base_by_path_and_digest(adapter_runs):
    r = adapter_runs
    assert r["config"]["base"] == r["base"] and r["config"]["base_digest"] == r["old"]


def test_unchanged_base_merges_and_generates(adapter_runs):
    r = adapter_runs
    assert r["merge_same"].returncode == 0, r["merge_same"].stderr[-2000:]
    assert os.path.isfile(r["tmp"] / "merged_same" / ckpt.MODEL_FILE)
    assert r["generate_same"].returncode == 0, r["generate_same"].stderr[-2000:]
    assert "assistant: " in r["generate_same"].stdout


@pytest.mark.parametrize("command", ["merge", "generate"])
def test_base_retrained_under_an_adapter_is_refused_naming_both_digests(adapter_runs, command):
    r = adapter_runs
    p = r[f"{command}_retrained"]
    assert r["old"] != r["new"]
    assert p.returncode == 3, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert r["old"] in p.stderr and r["new"] in p.stderr and r["base"] in p.stderr and r["adapter"] in p.stderr
    assert "retrain the adapter" in p.stderr
    if command == "merge":
        assert not os.path.exists(r["tmp"] / "merged_retrained")  # nothing half-written


def test_adapter_config_without_base_digest_is_refused_unless_accepted(adapter_runs):
    r = adapter_runs
    p = r["merge_old_style"]
    assert p.returncode == 3 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "no base_digest" in p.stderr and r["old"] in p.stderr and "--accept-base" in p.stderr
    assert not os.path.exists(r["tmp"] / "merged_old_style")
    p = r["merge_old_style_accepted"]  # the explicit way on, as the message says
    assert p.returncode == 0 and "warning" in p.stderr and "no base_digest" in p.stderr, p.stderr[-3000:]
    assert os.path.isfile(r["tmp"] / "merged_accepted" / ckpt.MODEL_FILE)


def test_hf_base_identity_changes_when_its_weight_files_are_rewritten(tmp_path):
    """``hf:`` bases are identified by their weight files' names, sizes and times (stat only)."""
    from train.sft.adapters import init_digest

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"x" * 64)
    first = init_digest(f"hf:{tmp_path}")
    assert init_digest(f"hf:{tmp_path}") == first
    st = os.stat(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"y" * 64)  # same size, rewritten
    os.utime(tmp_path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert init_digest(f"hf:{tmp_path}") != first
    with pytest.raises(ckpt.CheckpointError, match="Hugging Face directory not found"):
        init_digest(f"hf:{tmp_path / 'missing'}")
