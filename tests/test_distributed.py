"""Every backend for real: 2 processes over gloo on CPU, started by the launchers users type.

One uninterrupted single-process run is the reference. Each backend runs 5 steps of the
same 10-step schedule, checkpoints and exits (train.stop_at_step=5); a fresh launch then
resumes to step 10. Losses must match the reference step for step, which also proves that
the global batch (micro x accumulation x data-parallel) is the same data on every backend.

Every run here is a fresh run as a user starts one: it trains its own tokenizer (rank 0,
while the other rank waits) and evaluates at step 0 and every 2 steps, so the validation
split across ranks and its collectives are exercised under every backend. DDP and ZeRO-2
are launched with no backend key: ``backend=auto`` must follow torchrun and deepspeed.

Tolerance: single, DDP and FSDP reduce gradients in the same order as the reference and
DeepSpeed in its own bucket order, so fp32 sums may differ in the last bits: losses are
compared to 1e-4 absolute (they are ~6.9; a wrong batch or a lost optimizer state moves
them by 1e-2 or more).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.ports import free_port

TOL = 1e-4
COMMON = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
    "data.seq_len=32", "train.micro_batch_size=2", "train.grad_accum_steps=2", "train.eval_every=2",
    "train.eval_sequences=8", "train.log_every=1", "train.sample_tokens=0", "logger.plot=false",
    "train.max_steps=10", "checkpoint.every=5", "optim.warmup_steps=2", "optim.lr=3e-3",
    "tokenizer.vocab_size=1024", "tokenizer.train_max_docs=120",
    # A large decay: a backend that decays other parameters than the reference (ZeRO-3's
    # 1-D partitions once decayed none) moves its losses far beyond TOL.
    "optim.weight_decay=5.0",
]
VAL_TOL = 1e-5  # step-0 validation: same weights, same windows; only the summation order differs
BACKENDS = {  # name: (launcher, overrides, what the header must say)
    "ddp": ("torchrun", [], "backend=ddp (auto: torchrun started 2 processes"),
    # fsdp and zero3 also compute the loss in chunks (64 positions per micro-batch, chunks of 48): the
    # output layer is then called per chunk and recomputed in backward, under sharding.
    "fsdp": ("torchrun", ["backend=fsdp", "model.loss_chunk=48"], "backend=fsdp (set in the config)"),
    "zero1": ("deepspeed", ["backend=deepspeed", "backend.zero_stage=1"], "backend=deepspeed"),
    "zero2": ("deepspeed", [], "backend=deepspeed (auto: deepspeed started 2 processes; ZeRO stage 2"),
    "zero3": ("deepspeed", ["backend=deepspeed", "backend.zero_stage=3", "model.loss_chunk=48"], "backend=deepspeed"),
    # checkpoint.async_save: DCP's async_save under FSDP; under ZeRO the hashing and commit
    # run in the background. Their checkpoints must resume exactly like the synchronous ones.
    "fsdp_async": ("torchrun", ["backend=fsdp", "model.loss_chunk=48", "checkpoint.async_save=true"],
                   "backend=fsdp (set in the config)"),
    "zero2_async": ("deepspeed", ["checkpoint.async_save=true"], "backend=deepspeed (auto: deepspeed started 2"),
}


def launch(launcher: str, args: list[str], nproc: int = 2, timeout: int = 600) -> str:
    port = free_port()
    if launcher == "python":
        cmd = [sys.executable, "launch/pretrain.py", *args]
    elif launcher == "torchrun":
        cmd = ["torchrun", "--nproc_per_node", str(nproc), "--master_port", port, "launch/pretrain.py", *args]
    elif launcher == "deepspeed":
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", port, "launch/pretrain.py", *args]
    elif launcher == "accelerate":
        # --multi_gpu starts torch.distributed workers; without GPUs they run on CPU over gloo.
        cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(nproc), "--main_process_port", port,
               "launch/pretrain.py", *args]
    else:
        raise ValueError(launcher)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p.stdout + p.stderr


def losses(run_dir, kind: str = "train") -> dict[int, float]:
    """Training losses by step, or with kind="eval" the validation losses."""
    key = "loss" if kind == "train" else "val_loss"
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["kind"] == kind:
                out[r["step"]] = r[key]
    return out


def assert_close(got: dict, want: dict, steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= TOL, f"step {s}: {got[s]} vs {want[s]} (all: {got} vs {want})"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    """The reference run, and every backend stopped at step 5 (checkpoint kept aside)."""
    root = tmp_path_factory.mktemp("dist")
    # The reference: one process, micro-batch 4 = 2 per rank x 2 ranks, same accumulation.
    ref = root / "reference"
    launch("python", COMMON + [f"run_dir={ref}", "train.micro_batch_size=4"])
    stopped, headers = {}, {}
    for name, (launcher, extra, _) in BACKENDS.items():
        run_dir = root / name
        headers[name] = launch(launcher, COMMON + extra + [f"run_dir={run_dir}", "train.stop_at_step=5"])
        shutil.copytree(run_dir, root / f"{name}-at5")  # pristine copy for cross-resume tests
        stopped[name] = run_dir
    single = root / "single"
    headers["single"] = launch("python", COMMON + [f"run_dir={single}", "train.micro_batch_size=4",
                                                   "train.stop_at_step=5"])
    stopped["single"] = single
    # Later launches in new run directories use the tokenizer every run above trained.
    common = COMMON + [f"tokenizer.path={ref / 'tokenizer.model'}"]
    return {"root": root, "ref": losses(ref), "ref_val": losses(ref, "eval"), "stopped": stopped,
            "headers": headers, "common": common}


def test_accelerate_launch_runs_two_ranks_matching_the_reference(runs):
    run_dir = runs["root"] / "accelerate"
    out = launch("accelerate", runs["common"] + [f"run_dir={run_dir}", "train.stop_at_step=5"])
    assert "backend=ddp (auto: accelerate started 2 processes" in out and "world_size=2" in out
    assert_close(losses(run_dir), runs["ref"], range(1, 6))
    assert_close(losses(run_dir, "eval"), runs["ref_val"], [0, 2, 4])


def test_background_data_workers_on_two_ranks_then_one_train_the_reference_steps(runs):
    """data.num_workers=2 per rank: the pipeline runs in worker processes; the checkpoint
    of the 2-process run holds the consumed position, and one process resumes from it."""
    run_dir = runs["root"] / "workers"
    launch("torchrun", runs["common"] + [f"run_dir={run_dir}", "data.num_workers=2", "train.stop_at_step=5"])
    assert_close(losses(run_dir), runs["ref"], range(1, 6))
    out = launch("python", runs["common"] + [f"run_dir={run_dir}", "data.num_workers=2", "train.micro_batch_size=4"])
    assert "resumed from" in out
    assert_close(losses(run_dir), runs["ref"], range(6, 11))
    assert_close(losses(run_dir, "eval"), runs["ref_val"], [0, 2, 4, 6, 8, 10])


@pytest.mark.parametrize("name", ["single", *BACKENDS])
def test_every_launch_trained_the_same_tokenizer_and_says_which_backend_runs(runs, name):
    header = runs["headers"][name]
    assert "trained tokenizer" in header
    want = BACKENDS[name][2] if name != "single" else "backend=single (auto: one process)"
    assert want in header, header[-3000:]
    ref_tok = (runs["root"] / "reference" / "tokenizer.model").read_bytes()
    assert (runs["stopped"][name] / "tokenizer.model").read_bytes() == ref_tok


@pytest.mark.parametrize("name", ["single", *BACKENDS])
def test_validation_loss_equals_the_one_process_value_on_every_backend(runs, name):
    got, want = losses(runs["stopped"][name], "eval"), runs["ref_val"]
    assert {0, 2, 4} <= set(got)
    assert abs(got[0] - want[0]) <= VAL_TOL, (got, want)
    assert_close(got, want, [2, 4])


def test_single_backend_under_a_two_process_launcher_is_a_config_error(tmp_path):
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", free_port(),
           "launch/pretrain.py", "backend=single", f"run_dir={tmp_path / 'run'}"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode != 0
    assert "config error: backend.name: backend=single runs one process, but torchrun started 2" in p.stderr
    assert not os.path.exists(tmp_path / "run" / "tokenizer.model")  # failed before any heavy work


def test_reference_run_learns(runs):
    ref = runs["ref"]
    assert sorted(ref) == list(range(1, 11))
    assert ref[10] < ref[1] - 0.1


@pytest.mark.parametrize("name", ["single", *BACKENDS])
def test_first_five_steps_match_the_reference_on_every_backend(runs, name):
    got = losses(runs["stopped"][name])
    assert sorted(got) == [1, 2, 3, 4, 5]  # stopped at 5
    assert_close(got, runs["ref"], range(1, 6))
    ckpt = runs["stopped"][name] / "checkpoints"
    assert (ckpt / "step_00000005" / "meta.json").exists()


@pytest.mark.parametrize("name", ["single", *BACKENDS])
def test_a_saves_blocked_time_is_accounted_for_by_its_parts_on_every_backend(runs, name):
    """The checkpoint record splits ``blocked_s`` into where it went (starting the save, the
    writers, FSDP's staging copy, the commit, pruning), so a slow save can be traced."""
    with open(runs["stopped"][name] / "metrics.jsonl") as f:
        saves = [r for r in map(json.loads, f) if r["kind"] == "checkpoint"]
    assert saves
    for r in saves:
        parts = {k: v for k, v in r.items() if k.startswith("blocked_") and k != "blocked_s"}
        assert {"blocked_start_s", "blocked_staging_s", "blocked_commit_s"} <= set(parts), r
        assert all(v >= 0 for v in parts.values()), r
        assert abs(sum(parts.values()) - r["blocked_s"]) < 1e-6, r


@pytest.mark.parametrize("name", ["single", *BACKENDS])
def test_fresh_launch_resumes_and_steps_6_to_10_match_the_uninterrupted_run(runs, name):
    run_dir = runs["stopped"][name]
    if name == "single":
        out = launch("python", runs["common"] + [f"run_dir={run_dir}", "train.micro_batch_size=4"])
    else:
        launcher, extra, _ = BACKENDS[name]
        out = launch(launcher, COMMON + extra + [f"run_dir={run_dir}"])
    assert "resumed from" in out and "step_00000005" in out
    assert_close(losses(run_dir), runs["ref"], range(6, 11))
    assert_close(losses(run_dir, "eval"), runs["ref_val"], [6, 8, 10])


def resume_elsewhere(runs, source: str, launcher: str, extra: list[str], nproc: int = 2, micro: int = 2):
    target = "-".join(e.split("=")[-1] for e in extra) or "single"
    run_dir = runs["root"] / f"{source}-to-{launcher}-{target}"
    shutil.copytree(runs["root"] / f"{source}-at5", run_dir)
    out = launch(launcher, runs["common"] + extra + [f"run_dir={run_dir}", f"train.micro_batch_size={micro}"],
                 nproc=nproc)
    assert "resumed from" in out
    assert_close(losses(run_dir), runs["ref"], range(6, 11))


def test_two_process_fsdp_checkpoint_resumes_in_one_process(runs):
    resume_elsewhere(runs, "fsdp", "python", [], micro=4)


def test_two_process_zero2_checkpoint_resumes_in_one_process(runs):
    resume_elsewhere(runs, "zero2", "python", [], micro=4)


def test_one_process_checkpoint_resumes_in_two_processes_under_zero1(runs):
    shutil.copytree(runs["stopped"]["single"], runs["root"] / "single-at5", dirs_exist_ok=True)
    # single-at5 may already have been resumed to 10 by another test: use the step-5 checkpoint only
    ckpts = runs["root"] / "single-at5" / "checkpoints"
    for d in os.listdir(ckpts):
        if d.startswith("step_") and d != "step_00000005":
            shutil.rmtree(ckpts / d)
    (ckpts / "latest").write_text("step_00000005\n")
    resume_elsewhere(runs, "single", "deepspeed", ["backend=deepspeed", "backend.zero_stage=1"])


def test_zero3_checkpoint_resumes_under_fsdp(runs):
    resume_elsewhere(runs, "zero3", "torchrun", ["backend=fsdp"])


def test_fsdp_checkpoint_resumes_under_zero3(runs):
    resume_elsewhere(runs, "fsdp", "deepspeed", ["backend=deepspeed", "backend.zero_stage=3"])


def convert(*args: str) -> dict:
    p = subprocess.run([sys.executable, "launch/convert_checkpoint.py", *args], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def full_state(path: str):
    from model.llama import Transformer
    from train.checkpoint import read_model_config
    from train.checkpoint.full_state import read_full_state

    return read_full_state(path, Transformer(read_model_config(path)))


def test_zero3_checkpoint_converted_offline_to_fsdp_resumes_under_fsdp(runs):
    src = runs["root"] / "zero3-at5" / "checkpoints" / "step_00000005"
    out = runs["root"] / "converted" / "zero3-as-fsdp"
    info = convert(str(src), str(out), "--to", "fsdp")
    assert info["format"] == "dcp" and (out / "dcp").is_dir() and not (out / "deepspeed").exists()
    a, b = full_state(str(src)), full_state(str(out))
    assert a.step == b.step == 5
    assert all(torch_equal(a.model[k], b.model[k]) for k in a.model)
    assert all(torch_equal(a.moments[k][m], b.moments[k][m]) for k in a.moments for m in ("exp_avg", "exp_avg_sq"))
    run_dir = runs["root"] / "resumed-from-converted"
    launch("torchrun", runs["common"] + ["backend=fsdp", f"run_dir={run_dir}", f"resume={out}"])
    assert_close(losses(run_dir), runs["ref"], range(6, 11))


def test_fsdp_checkpoint_converted_to_native_deepspeed_is_lossless_and_resumes_natively(runs):
    src = runs["root"] / "fsdp-at5" / "checkpoints" / "step_00000005"
    out = runs["root"] / "converted" / "fsdp-as-zero2"
    info = convert(str(src), str(out), "--to", "deepspeed", "--zero-stage", "2", "--world-size", "2")
    assert (info["backend"], info["zero_stage"], info["world_size"]) == ("deepspeed", 2, 2)
    a, b = full_state(str(src)), full_state(str(out))
    assert all(torch_equal(a.model[k], b.model[k]) for k in a.model)
    assert all(torch_equal(a.moments[k][m], b.moments[k][m]) for k in a.moments for m in ("exp_avg", "exp_avg_sq"))
    run_dir = runs["root"] / "resumed-natively"
    out_text = launch("deepspeed", runs["common"] + ["backend=deepspeed", "backend.zero_stage=2",
                                                     f"run_dir={run_dir}", f"resume={out}"])
    assert "resumed from" in out_text
    assert_close(losses(run_dir), runs["ref"], range(6, 11))


def test_consolidated_weights_file_loads_into_the_model(runs):
    from safetensors.torch import load_model

    from model.llama import Transformer
    from train.checkpoint import read_model_config

    src = runs["root"] / "zero2-at5" / "checkpoints" / "step_00000005"
    out = runs["root"] / "converted" / "weights"
    info = convert(str(src), str(out), "--to", "weights")
    model = Transformer(read_model_config(str(src)))
    load_model(model, info["out"])
    ref = full_state(str(src))
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert all(torch_equal(p, ref.model[n]) for n, p in model.state_dict().items())


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.float(), b.float()))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_data_state_is_stored_once_and_equals_the_one_process_state(runs, name):
    """sequences mode: the stream position is global, so a 2-process checkpoint stores it once,
    and it is the very state a 1-process run at the same step stores."""
    def data_state(run_dir):
        with open(run_dir / "checkpoints" / "step_00000005" / "trainer_state.json") as f:
            return json.load(f)["data"]

    two, one = data_state(runs["root"] / f"{name}-at5"), data_state(runs["stopped"]["single"])
    assert len(two) == 1 and two == one
