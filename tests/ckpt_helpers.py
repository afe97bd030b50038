"""Real checkpoints of every storage format, and what an attacker or an unlucky user does to
them: shared by the checkpoint integrity and attack tests (one set of launches per session,
made by the ``runs`` fixture in conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.conftest import REPO
from tests.ports import free_port
from train import checkpoint as ckpt

RUN = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
       "data.seq_len=32", "train.micro_batch_size=2", "train.eval_every=2", "train.eval_sequences=4",
       "train.log_every=1", "train.sample_tokens=0", "logger.plot=false", "train.max_steps=4", "checkpoint.every=2",
       "optim.warmup_steps=1"]


def launch(cmd: list[str], ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    if ok:
        assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def pretrain(*args: str, launcher=(sys.executable,), ok: bool = True) -> subprocess.CompletedProcess:
    return launch([*launcher, "launch/pretrain.py", *args], ok)


def make_native_runs(tmp_path_factory, tokenizer_path):
    """Run dirs with checkpoints at steps 2 and 4: full (single), dcp (fsdp), deepspeed (ZeRO-1)."""
    root = tmp_path_factory.mktemp("integrity")
    common = RUN + [f"tokenizer.path={tokenizer_path}"]
    out = {"common": common, "root": root}
    pretrain(*common, f"run_dir={root / 'full'}")
    pretrain(*common, "backend=fsdp", f"run_dir={root / 'dcp'}")
    port = free_port()
    pretrain(*common, "backend=deepspeed", "backend.zero_stage=1", f"run_dir={root / 'deepspeed'}",
             launcher=("deepspeed", "--num_gpus", "1", "--master_port", port))
    return out


def fresh_copy(runs, kind: str, name: str):
    dst = runs["root"] / name
    shutil.copytree(runs["root"] / kind, dst)
    return dst


def flip_one_byte(path) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x01]))


def reseal(step_dir) -> None:
    """Rewrite the manifest as a forger who can write the directory would."""
    meta = ckpt.read_meta(str(step_dir))
    meta["files"] = ckpt.manifest(str(step_dir))
    ckpt.write_json_atomic(os.path.join(step_dir, ckpt.META), meta)


class Payload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))




READERS = ["resume", "init_from", "sft", "export", "generate", "evaluate", "convert", "score_rewards"]
PAIRS = "data_pipeline/assets/sft/python_prefs.jsonl"


def reader_command(reader: str, step: str, common: list[str], tmp_path, resume_extra=()) -> list[str]:
    """The command line of one entry point that reads the checkpoint at ``step``."""
    return {
        "resume": [sys.executable, "launch/pretrain.py", *common, f"resume={step}", "train.max_steps=6",
                   *resume_extra],
        "init_from": [sys.executable, "launch/pretrain.py", *common, f"init_from={step}"],
        "sft": [sys.executable, "launch/sft.py", f"init_from={step}", f"run_dir={tmp_path / 'sft'}",
                "train.max_steps=1", "data.seq_len=32"],
        "score_rewards": [sys.executable, "launch/score_rewards.py", step, PAIRS],
        "export": [sys.executable, "launch/export_hf.py", step, str(tmp_path / "hf")],
        "generate": [sys.executable, "launch/generate.py", step, "--prompt", "Hello", "--max-new-tokens", "4"],
        "evaluate": [sys.executable, "launch/evaluate.py", step],
        "convert": [sys.executable, "launch/convert_checkpoint.py", step, str(tmp_path / "out"), "--to", "full"],
    }[reader]
