"""launch/dpo.py for real: a tiny pretraining checkpoint trained on the shipped preference
pairs. At step 0 the policy is the reference (loss ln 2, margin 0); accumulation and world
size do not change the losses; ZeRO-3 (deepspeed) and FSDP (torchrun) on 2 processes match 1
process (evaluation on);
a stopped run resumes bit-exactly; LoRA runs with the base as reference; bad records are
named or counted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY
from tests.ports import free_port
from tests.sft_helpers import tiny_checkpoint, write_jsonl

PREFS = os.path.join(REPO, "data_pipeline", "assets", "sft", "python_prefs.jsonl")
COMMON = [o for o in TINY if not o.startswith(("train.micro_batch_size", "train.eval_sequences", "data.seq_len"))] + [
    "data.seq_len=64", "train.max_steps=4", "train.log_every=1", "train.eval_every=2", "train.eval_sequences=5",
    "checkpoint.every=2", "eval.prompts=[]", "optim.lr=1e-3", "optim.warmup_steps=1", "sft.val_fraction=0.2",
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    rows = [json.loads(line) for line in open(PREFS)][:48]
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "pairs.jsonl", rows)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


def dpo(run_dir, base, pairs, *extra, launcher=None):
    port = free_port()
    start = {None: [sys.executable], "deepspeed": ["deepspeed", "--num_gpus", "2", "--master_port", port],
             "torchrun": ["torchrun", "--nproc_per_node", "2", "--master_port", port]}[launcher]
    cmd = [*start, "launch/dpo.py", *COMMON, f"run_dir={run_dir}", f"init_from={base}", f"sft.paths=[{pairs}]", *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def metrics(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == kind}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base, pairs):
    run_dir = tmp_path_factory.mktemp("dpo") / "ref"
    out = dpo(run_dir, base, pairs, "train.micro_batch_size=4")
    return run_dir, out


def test_step_zero_is_the_reference_and_training_moves_the_rewards(reference):
    run_dir, out = reference
    ev = metrics(run_dir, "eval")
    assert ev[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(ev[0]["reward_margin"]) < 1e-4
    assert ev[4]["reward_margin"] != pytest.approx(0.0, abs=1e-3)  # the policy left the reference
    assert "held-out reward accuracy" in out
    assert sorted(metrics(run_dir, "train")) == [1, 2, 3, 4]


def test_accumulation_does_not_change_the_losses(tmp_path, base, pairs, reference):
    run_dir = tmp_path / "accum"
    dpo(run_dir, base, pairs, "train.micro_batch_size=2", "train.grad_accum_steps=2")
    got, want = metrics(run_dir, "train"), metrics(reference[0], "train")
    for s in range(1, 5):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], abs=1e-5)


@pytest.mark.parametrize("launcher,backend", [
    ("deepspeed", ["backend=deepspeed", "backend.zero_stage=3"]),
    ("torchrun", ["backend=fsdp"]),
], ids=["zero3-deepspeed", "fsdp-torchrun"])
def test_sharded_on_two_processes_matches_one_process(tmp_path, base, pairs, reference, launcher, backend):
    """The reference pass and the training step on a sharded model (each rank holds a part
    of every weight): the same losses, evaluation and reward accuracy as one process."""
    run_dir = tmp_path / "sharded"
    dpo(run_dir, base, pairs, *backend, "train.micro_batch_size=2", launcher=launcher)
    got, want = metrics(run_dir, "train"), metrics(reference[0], "train")
    for s in range(1, 5):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], abs=1e-4)
    # 5 held-out pairs: one rank runs a padding batch, as the other's last batch forward needs.
    ev, ref_ev = metrics(run_dir, "eval"), metrics(reference[0], "eval")
    for s in (0, 2, 4):
        assert ev[s]["val_loss"] == pytest.approx(ref_ev[s]["val_loss"], abs=1e-4)
        assert ev[s]["reward_margin"] == pytest.approx(ref_ev[s]["reward_margin"], abs=1e-5)
    for s in (2, 4):  # at step 0 every margin is float noise around 0
        assert ev[s]["reward_accuracy"] == pytest.approx(ref_ev[s]["reward_accuracy"])
    assert ev[4]["reward_margin"] > 1e-3  # and the compared margins are not all zero


def test_a_stopped_run_resumes_exactly(tmp_path, base, pairs, reference):
    """The resumed half reads the reference log-probs the first half stored (dpo.reference_cache)."""
    run_dir, cache = tmp_path / "resume", tmp_path / "ref.json"
    dpo(run_dir, base, pairs, "train.micro_batch_size=4", "train.stop_at_step=2", f"dpo.reference_cache={cache}")
    assert json.load(open(cache))["fingerprint"]
    out = dpo(run_dir, base, pairs, "train.micro_batch_size=4", f"dpo.reference_cache={cache}")
    assert "resumed from" in out and "reference log-probs read from" in out
    got, want = metrics(run_dir, "train"), metrics(reference[0], "train")
    assert [got[s]["loss"] for s in (3, 4)] == [want[s]["loss"] for s in (3, 4)]


def test_a_resumed_run_without_its_cache_recomputes_the_reference_and_resumes_exactly(tmp_path, base, pairs,
                                                                                      reference):
    """The recompute path: the first half writes dpo.reference_cache, the file is gone before
    the second half, which must recompute the reference from the starting weights (not the
    resumed ones: the pass runs before the checkpoint is loaded) and continue exactly."""
    run_dir, cache = tmp_path / "recompute", tmp_path / "ref.json"
    dpo(run_dir, base, pairs, "train.micro_batch_size=4", "train.stop_at_step=2", f"dpo.reference_cache={cache}")
    first = json.load(open(cache))
    os.remove(cache)
    out = dpo(run_dir, base, pairs, "train.micro_batch_size=4", f"dpo.reference_cache={cache}")
    assert "resumed from" in out and "reference log-probs read from" not in out
    assert "computed from the starting weights" in out
    assert json.load(open(cache))["ref"] == first["ref"]  # the same values, recomputed
    got, want = metrics(run_dir, "train"), metrics(reference[0], "train")
    assert [got[s]["loss"] for s in (3, 4)] == [want[s]["loss"] for s in (3, 4)]


def test_lora_policy_uses_the_base_as_reference(tmp_path, base, pairs):
    run_dir = tmp_path / "lora"
    dpo(run_dir, base, pairs, "train.micro_batch_size=4", "lora.enabled=true", "lora.rank=4", "optim.lr=1e-2")
    ev = metrics(run_dir, "eval")
    assert ev[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and ev[4]["reward_margin"] != 0.0
    assert os.path.exists(run_dir / "checkpoints" / "step_00000004" / "adapter.safetensors")


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, base, pairs):
    rows = [json.loads(line) for line in open(pairs)][:20]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows + ['{"prompt": "q", "chosen": "same", "rejected": "same"}',
                                                      "{broken"])
    p = subprocess.run([sys.executable, "launch/dpo.py", *COMMON, f"run_dir={tmp_path / 'b'}", f"init_from={base}",
                        f"sft.paths=[{bad}]"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and f"{bad}:21" in p.stderr + p.stdout
    out = dpo(tmp_path / "s", base, bad, "sft.skip_bad_records=true", "train.max_steps=1", "train.eval_every=1",
              "checkpoint.every=1")
    assert '"skipped_bad": 2' in out


def test_reward_model_learns_to_rank_the_held_out_pairs(tmp_path, base, pairs):
    """The shipped pairs (answer vs its word-shuffled copy) on a known split: the reward model
    starts near chance and ranks the held-out chosen replies above the rejected ones."""
    from safetensors import safe_open

    run_dir = tmp_path / "reward"
    p = subprocess.run([sys.executable, "launch/reward.py", *COMMON, f"run_dir={run_dir}", f"init_from={base}",
                        f"sft.paths=[{pairs}]", "train.micro_batch_size=4", "train.max_steps=12", "train.eval_every=12",
                        "checkpoint.every=12", "optim.lr=3e-3"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline"))
    assert p.returncode == 0, p.stderr[-3000:]
    ev = metrics(run_dir, "eval")
    assert ev[12]["reward_accuracy"] >= 0.8 and ev[12]["reward_accuracy"] > ev[0]["reward_accuracy"]
    assert ev[12]["reward_margin"] > ev[0]["reward_margin"]
    with safe_open(str(run_dir / "checkpoints" / "step_00000012" / "model.safetensors"), "pt") as f:
        assert "value.weight" in f.keys()  # a kiln checkpoint: the LM's weights plus the reward head
    # The scoring command reads the checkpoint as training left it and ranks the pairs the same way.
    scored = subprocess.run([sys.executable, "launch/score_rewards.py", str(run_dir), pairs], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    summary = json.loads(scored.stdout.strip().splitlines()[-1])
    assert summary["pairs"] == 48 and summary["accuracy"] >= 0.8 and summary["mean_margin"] > 0
    not_reward = subprocess.run([sys.executable, "launch/score_rewards.py", base, pairs], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
    assert not_reward.returncode == 2 and "no reward head" in not_reward.stderr
