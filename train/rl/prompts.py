"""What the RL task (train/tasks/rl.py) samples from, and where it stands: the prompts of
``sft.paths`` (encoded through the chat template, split into train and held-out), the
endless seeded prompt stream whose position is checkpointed, and every rank's sampling
generator state together with the reference's identity."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from train.errors import ConfigError


def prompt_text(rec) -> Optional[str]:
    """The user prompt of a record: ``prompt`` (text), alpaca ``instruction`` (+ ``input``),
    or the first user turn of ``messages``; None when it has none."""
    if not isinstance(rec, dict):
        return None
    if isinstance(rec.get("prompt"), str):
        return rec["prompt"]
    if isinstance(rec.get("instruction"), str):
        extra = rec.get("input") or ""
        return rec["instruction"] + (f"\n\n{extra}" if extra else "")
    for m in rec.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            return str(m.get("content", ""))
    return None


def load_prompts(cfg, tok) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(train, held-out) prompts of ``sft.paths``, encoded through the chat template, unique,
    split by a stable hash (``sft.val_fraction``); prompts that leave no room for
    ``rl.max_new_tokens`` inside ``data.seq_len`` are dropped."""
    from data_pipeline.stream import split_of
    from train.sft.chat import encode_prompt
    from train.sft.records import raw_records

    room = int(cfg.data.seq_len) - int(cfg.rl.max_new_tokens)
    seen, train, val = set(), [], []
    for path in cfg.sft.paths:
        for _, rec in raw_records(str(path), cfg.sft.source, cfg.sft.hf_split):
            text = prompt_text(rec)
            if not text or text in seen:
                continue
            seen.add(text)
            ids = encode_prompt(tok, text)
            if len(ids) > room:
                continue
            (val if split_of(text, float(cfg.sft.val_fraction)) == "val" else train).append((text, ids))
    if not train:
        raise ConfigError("sft.paths", f"no usable prompt in {list(cfg.sft.paths)} (each needs data.seq_len - "
                          f"rl.max_new_tokens = {room} tokens of room)")
    return train, val


class PromptStream:
    """Endless prompts, reshuffled every epoch (seeded); its position is checkpointed."""

    fields = ("prompts",)

    def __init__(self, prompts: list, seed: int):
        self.prompts, self.seed, self.epoch, self.index = prompts, seed, 0, 0

    def take(self, n: int) -> list:
        out = []
        for _ in range(n):
            if self.index >= len(self.prompts):
                self.epoch, self.index = self.epoch + 1, 0
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
            out.append(self.prompts[int(order[self.index])])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"prompts": {"epoch": self.epoch, "index": self.index}}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["prompts"]["epoch"]), int(state["prompts"]["index"])


class SamplerState:
    """Every rank's sampling generator state and the reference's identity, as trainer_state.json
    fields: ``sampler`` holds one state per rank (gathered, like ``RNGStates``), and each rank
    restores its own. ``restored`` says whether it did: a checkpoint written by another number
    of ranks (or before states were kept per rank) restores rank 0's only, and ``loaded``
    that a checkpoint was read (the task then reseeds the ranks that restored nothing)."""

    fields = ("sampler", "reference_digest")

    def __init__(self, generator: torch.Generator, reference_digest: str, backend):
        self.g, self.digest, self.b = generator, reference_digest, backend
        self.restored = self.loaded = False

    def state_dict(self) -> dict:
        return {"sampler": self.b.all_gather_object(self.g.get_state().tolist()), "reference_digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("reference_digest")
        if saved is not None and saved != self.digest:
            raise ConfigError("init_from", f"the reference (init_from) has digest {self.digest}, but this run "
                              f"started from one with digest {saved}: it was retrained or replaced since; "
                              "start afresh (resume=none) or restore it")
        states = state["sampler"]
        if states and not isinstance(states[0], list):
            states = [states]  # one state: rank 0's (checkpoints written before every rank's was kept)
        mine = states[self.b.rank] if len(states) == self.b.world_size else states[0] if self.b.rank == 0 else None
        self.restored, self.loaded = mine is not None, True
        if mine is not None:
            self.g.set_state(torch.tensor(mine, dtype=torch.uint8))
