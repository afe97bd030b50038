"""Helpers for the HF-interop, generation and evaluation tests.

A plain module rather than conftest.py fixtures so it sits beside the project's conftest
without touching it. Importing it puts the repository on sys.path.

Every model here is tiny and random or trained for two steps: the tests check exact
equalities (ids, logits, tokens), which need no quality. Torch runs on one thread: on a
small shared CPU, two OpenMP threads fighting other processes are ~10x slower than one.
"""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
           PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

# A real two-step pretraining run: tokenizer trained on the bundled WARC, GQA, tied embeddings.
TINY_RUN = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
    "data.seq_len=64", "tokenizer.vocab_size=1024", "tokenizer.train_max_docs=120", "train.micro_batch_size=2",
    "train.max_steps=2", "train.eval_every=0", "train.sample_tokens=0", "logger.plot=false",
]

_cache: dict[str, str] = {}


def launch(script: str, *args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``launch/<script>`` as a user would, in a fresh interpreter."""
    p = subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=timeout, env=ENV)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def tiny_run(tmp_path_factory) -> str:
    """The run directory of a real tiny pretraining run, made once per test session."""
    if "run" not in _cache:
        run_dir = tmp_path_factory.mktemp("hf_tiny") / "run"
        launch("pretrain.py", f"run_dir={run_dir}", *TINY_RUN)
        _cache["run"] = str(run_dir)
    return _cache["run"]


def tiny_export(tmp_path_factory) -> str:
    """The HF export of ``tiny_run``'s latest checkpoint (in process), made once per session."""
    if "export" not in _cache:
        from train.hf_export import export_hf

        out = str(tmp_path_factory.mktemp("hf_export") / "hf")
        export_hf(tiny_run(tmp_path_factory), out)
        _cache["export"] = out
    return _cache["export"]
