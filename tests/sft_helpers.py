"""Helpers for the fine-tuning tests: a tiny real pretraining checkpoint, SFT configs composed
through Hydra as launch/sft.py composes them, and small chat datasets of varied lengths.

A module rather than conftest fixtures so the project's conftest stays untouched."""

from __future__ import annotations

import json
import os

import torch

from tests.conftest import TINY, compose

torch.set_num_threads(1)

_cache: dict[str, str] = {}

SFT_TINY = [
    "data.seq_len=64", "train.micro_batch_size=4", "train.grad_accum_steps=1",
    "train.log_every=1", "train.max_steps=4", "checkpoint.every=100", "logger.plot=false", "eval.prompts=[]",
    "optim.warmup_steps=1", "optim.lr=3e-3", "sft.val_fraction=0.0",
]


def tiny_checkpoint(tmp_path_factory, tokenizer_path: str) -> str:
    """Run dir of a 2-step tiny pretraining run (single process, in-process), once per session."""
    if "ckpt" not in _cache:
        from train.trainer import Trainer

        run_dir = tmp_path_factory.mktemp("sft_base") / "run"
        cfg = compose(TINY + [f"run_dir={run_dir}", f"tokenizer.path={tokenizer_path}", "train.max_steps=2",
                              "checkpoint.every=2"])
        Trainer(cfg).fit()
        _cache["ckpt"] = str(run_dir)
    return _cache["ckpt"]


def sft_cfg(run_dir, init_from: str, data: list[str], *extra: str):
    from train.config import validate
    from train.sft.config import register_sft_configs, validate_sft

    register_sft_configs()
    paths = "[" + ",".join(str(p) for p in data) + "]"
    cfg = compose([*SFT_TINY, f"run_dir={run_dir}", f"init_from={init_from}", f"sft.paths={paths}", *extra],
                  config_name="sft")
    validate(cfg)
    validate_sft(cfg)
    return cfg


WORDS = ("list dict set tuple file path module class function value error string bytes number loop "
         "thread socket parser token buffer stream").split()


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Conversations of very different lengths (1-2 turns, 1-8-word answers): micro-batches then
    hold different numbers of loss tokens, which is what the normalisation tests need."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "Answer briefly."})
        for _ in range(1 + i % 2):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
            msgs += [{"role": "user", "content": f"What is a {q}?"}, {"role": "assistant", "content": f"A {a}."}]
        rows.append({"messages": msgs})
    return rows


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def chat_file(tmp_path, n: int = 24, seed: int = 0) -> str:
    return write_jsonl(os.path.join(tmp_path, f"chat{seed}.jsonl"), chat_rows(n, seed))
