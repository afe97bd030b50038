"""Every command in README.md's bash blocks that can run on this CPU is run here as written,
in README order, from a fresh workspace (the repo's code linked into an empty directory, so
`runs/`, `data/`, `out/` start empty as on a fresh clone). The README cannot drift from the
code without this test failing.

What is changed, and only this: training commands get small step counts (the keys below,
replaced where the command sets them, appended where it does not), and placeholder paths
that stand for a user's own files get a local stand-in (table below). Commands that need
GPUs, a Slurm cluster or the test command itself are listed with the reason; a README
command that is neither run nor explained fails the test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, SAMPLE_WARC

CODE_DIRS = ("launch", "conf", "train", "model", "data_pipeline", "scripts", "slurm")

# Training commands finish in seconds with these. The quick start's run, which the later
# commands fine-tune, export and evaluate, trains longer so that it has learned something
# (validation loss about 7.9 against 9.0 for a uniform guess); a command that resumes from it
# trains 2 steps more.
QUICK_START_STEPS = {"train.max_steps": "40", "train.eval_every": "20", "checkpoint.every": "20"}
SMALL = {
    "pretrain.py": {"train.max_steps": "4", "train.eval_every": "2", "checkpoint.every": "2",
                    "train.eval_sequences": "8", "train.log_every": "1", "train.micro_batch_size": "2",
                    "data.seq_len": "64", "train.sample_tokens": "8"},
    "sft.py": {"train.max_steps": "4", "train.eval_every": "2", "checkpoint.every": "2",
               "train.eval_sequences": "8", "train.log_every": "1", "eval.max_new_tokens": "8"},
    "dpo.py": {"train.max_steps": "4", "train.eval_every": "2", "checkpoint.every": "2",
               "train.eval_sequences": "8", "train.log_every": "1", "eval.max_new_tokens": "8"},
    "reward.py": {"train.max_steps": "4", "train.eval_every": "2", "checkpoint.every": "2",
                  "train.eval_sequences": "8", "train.log_every": "1"},
    "ppo.py": {"train.max_steps": "2", "train.eval_every": "2", "checkpoint.every": "2", "rl.prompts_per_step": "2",
               "rl.max_new_tokens": "8", "rl.eval_prompts": "2", "rl.minibatches": "1"},
    "grpo.py": {"train.max_steps": "2", "train.eval_every": "2", "checkpoint.every": "2", "rl.prompts_per_step": "2",
                "rl.max_new_tokens": "8", "rl.eval_prompts": "2", "rl.minibatches": "1"},
}

# The README names a user's own files; these stand in for them.
STAND_INS = {
    "/data/tok.model": "runs/default/tokenizer.model",
    "/data/cc/*.warc.gz": SAMPLE_WARC,
    "hf:/models/TinyLlama-1.1B": "hf:runs/default/hf",  # exported two commands earlier
    "runs/x": "runs/default", "runs/zero3": "runs/default", "runs/fsdp": "runs/default",
    "runs/big": "runs/default",
}


def why_not_here(command: str):
    """Why a README command is not run by this test, or None when it is."""
    if "pytest" in command:
        return "the test command: it is what runs this test"
    if re.search(r"--num_gpus 8|--nproc_per_node 8|--num_processes 8|--hostfile|train=gpu", command):
        return ("needs GPUs; the same launchers run with 2 CPU processes in tests/test_distributed.py "
                "and tests/test_launcher.py")
    if re.search(r"\bsbatch\b|\bsqueue\b|slurm/local|SLURM_", command):
        return "a Slurm job: tests/test_slurm.py submits these scripts to a real local Slurm"
    return None


def readme_commands() -> list[tuple[int, str]]:
    """(line number, command) for each command of README.md's ```bash blocks, continuation
    lines joined, comment lines dropped."""
    out, fence, bash, pending = [], False, False, None
    with open(os.path.join(REPO, "README.md")) as f:
        for no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("```"):
                fence, bash = not fence, (not fence) and line.strip() == "```bash"
                continue
            if not (fence and bash) or not line.strip() or line.lstrip().startswith("#"):
                continue
            if pending:
                pending = (pending[0], pending[1] + " " + line.strip())
            else:
                pending = (no, line.strip())
            if pending[1].endswith("\\"):
                pending = (pending[0], pending[1][:-1].rstrip())
            else:
                out.append(pending)
                pending = None
    return out


def as_run_here(command: str) -> str:
    """The command as this test runs it: stand-ins for placeholder paths, small step counts,
    this interpreter for `python3`; `bash scripts/setup.sh &&` dropped (CI ran it already)."""
    segments, current = [], []
    for tok in shlex.split(command, comments=True):
        tok = tok.replace("\\`", "`")  # bash drops the backslash of \` inside double quotes; shlex keeps it
        if tok == "&&":
            segments.append(current)
            current = []
        else:
            current.append(tok)
    segments.append(current)
    rewritten = []
    for seg in segments:
        if seg[:2] == ["bash", "scripts/setup.sh"]:
            continue
        seg = [_stand_in(t) for t in seg]
        if seg[0] == "python3":
            seg[0] = sys.executable
        script = os.path.basename(seg[1]) if len(seg) > 1 else ""
        if script in SMALL:
            small = dict(SMALL[script])
            if seg[1:] == ["launch/pretrain.py"]:
                small.update(QUICK_START_STEPS)
            if any(t.startswith("resume=") for t in seg):
                small["train.max_steps"] = str(int(QUICK_START_STEPS["train.max_steps"]) + 2)
            seg = _small(seg, small)
        rewritten.append(shlex.join(seg))
    return " && ".join(rewritten)


def _stand_in(token: str) -> str:
    for placeholder, local in STAND_INS.items():
        if token == placeholder or token.startswith(placeholder + "/"):
            return local + token[len(placeholder):]
        token = re.sub(rf"(?<=[=\[']){re.escape(placeholder)}(?=[\]']|$)", local, token)
    return token


def _small(seg: list[str], small: dict) -> list[str]:
    out = []
    for tok in seg:
        key = tok.split("=", 1)[0]
        out.append(f"{key}={small.pop(key)}" if key in small else tok)
    return out + [f"{k}={v}" for k, v in small.items()]


COMMANDS = readme_commands()
RUN_HERE = [(no, c) for no, c in COMMANDS if why_not_here(c) is None]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("readme")
    for d in CODE_DIRS:
        os.symlink(os.path.join(REPO, d), ws / d)
    return ws


def test_every_readme_command_is_run_here_or_says_why_not():
    assert len(COMMANDS) >= 40, "README.md's bash blocks were not found"
    skipped = [(no, c, why_not_here(c)) for no, c in COMMANDS if why_not_here(c)]
    assert all(reason for _, _, reason in skipped)
    assert len(RUN_HERE) >= 20, [c for _, c in RUN_HERE]
    # The quick start's first command is among them, and runs first: the others use its run.
    assert RUN_HERE[0][1] == "bash scripts/setup.sh && python3 launch/pretrain.py"


@pytest.mark.parametrize("line,command", RUN_HERE, ids=[f"README.md:{no}" for no, _ in RUN_HERE])
def test_readme_command_runs_as_written(workspace, line, command):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(workspace), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("KILN_STOP_FILE", None)
    run = as_run_here(command)
    p = subprocess.run(["bash", "-c", run], cwd=workspace, env=env, capture_output=True, text=True,
                       timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"README.md:{line}: {command}\nran: {run}\n{out[-4000:]}"
    assert "Traceback" not in out, f"README.md:{line}: {command}\n{out[-4000:]}"


def test_lm_evaluation_harness_and_evaluate_agree_on_bits_per_byte(workspace):
    """The README's lm_eval and evaluate.py lines (run above, in order) score the same shipped
    documents with the same model, once exported to transformers and once as a kiln
    checkpoint: the harness's rolling log-likelihood from EOS and evaluate.py with
    --no-end-eos must give the same bits per byte."""
    import glob
    import json
    import math

    harness = sorted(glob.glob(str(workspace / "evals" / "**" / "results_*.json"), recursive=True))
    assert harness, "no lm_eval results: the README's lm_eval command did not run before this test"
    metrics = json.load(open(harness[-1]))["results"]["kiln_python_docs"]
    kiln = json.load(open(workspace / "evals" / "kiln.json"))
    assert kiln["docs"] == 104
    assert abs(metrics["bits_per_byte,none"] - kiln["bits_per_byte"]) <= 1e-4 * kiln["bits_per_byte"]
    assert abs(metrics["byte_perplexity,none"] - 2 ** kiln["bits_per_byte"]) <= 1e-3
    # a model that learned something, so agreement is not that of two uniform guesses
    uniform = kiln["tokens"] * math.log2(8192) / kiln["bytes"]
    assert kiln["bits_per_byte"] < 0.9 * uniform
