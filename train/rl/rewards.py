"""Where a rollout's score comes from: a kiln reward model, or a Python function.

A reward model is launch/reward.py's checkpoint read into ``model.value_head.ValueModel``
(same parameter names, ``value.weight`` included); its score of a row is the value at the
row's last real token -- the stop token, or the last sampled one -- exactly where the
reward model was trained to read it (the end-of-turn closing the reply). The reward model
must share the policy's tokenizer (same tokenizer.model content) and hold data.seq_len
positions, else the run stops with a ConfigError on rl.reward_model (tested). A reward function
(``rl.reward_fn=module:function``) is called once per batch with keyword arguments
``prompts``, ``responses`` (decoded text through the stop) and ``response_ids`` and returns
one float per row: verifiable rewards (a test passes, an answer matches).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

from train.errors import ConfigError
from train.rl.rollout import Rollout


def load_reward_fn(spec: str) -> Callable:
    module, _, name = str(spec).partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError("rl.reward_fn", f"cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError("rl.reward_fn", f"{spec!r} is not callable")
    return fn


def load_reward_model(path: str, verify: str, device: torch.device, tokenizer_path: str | None = None,
                      seq_len: int | None = None) -> torch.nn.Module:
    """A frozen ``ValueModel`` holding the reward checkpoint at ``path`` (any backend's format).

    With ``tokenizer_path`` (the policy's tokenizer) the reward checkpoint's tokenizer.model must
    be the same file (same content digest): token ids mean nothing to a model trained on another
    vocabulary. With ``seq_len`` (data.seq_len, which prompt + reply can reach) its max_seq_len
    must hold that many positions. Either mismatch is a ConfigError on rl.reward_model."""
    from model.value_head import ValueModel
    from train import checkpoint as ckpt
    from train.checkpoint.full_state import read_full_state

    try:
        step_dir = ckpt.resolve(path, verify)
    except FileNotFoundError as e:
        raise ConfigError("rl.reward_model", f"{e}. Make the default one with `python launch/reward.py`") from None
    mc = ckpt.read_model_config(step_dir)
    if tokenizer_path is not None:
        theirs = os.path.join(step_dir, ckpt.TOKENIZER)
        if not os.path.isfile(theirs):
            raise ConfigError("rl.reward_model", f"{step_dir} has no {ckpt.TOKENIZER}, so whether it reads the "
                              f"policy's token ids ({tokenizer_path}) cannot be checked")
        if ckpt.file_digest(theirs) != ckpt.file_digest(tokenizer_path):
            raise ConfigError("rl.reward_model", f"{step_dir} was trained with another tokenizer than the policy's "
                              f"({theirs} and {tokenizer_path} differ): it would score token ids of another "
                              "vocabulary; train the reward model from the policy's lineage (launch/reward.py)")
    if seq_len is not None and mc.max_seq_len < int(seq_len):
        raise ConfigError("rl.reward_model", f"{step_dir} has max_seq_len={mc.max_seq_len}, shorter than "
                          f"data.seq_len={seq_len} that prompt + reply can reach: lower data.seq_len (or "
                          "rl.max_new_tokens with it) or use a reward model with a longer context")
    mc.dropout = 0.0
    model = ValueModel(mc)
    try:
        state = read_full_state(step_dir, model, with_optimizer=False)
    except KeyError as e:
        raise ConfigError("rl.reward_model", f"{step_dir} is not a reward model ({e}): train one with "
                          "launch/reward.py") from None
    model.load_state_dict(state.model, strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


class Scorer:
    """score(rollout, prompt_texts) -> (B,) fp32 rewards on the rollout's device."""

    def __init__(self, cfg, tokenizer, device: torch.device, autocast):
        self.tok, self.device, self.autocast = tokenizer, device, autocast
        r = cfg.rl
        self.model = load_reward_model(str(r.reward_model), str(cfg.checkpoint.verify), device, tokenizer.path,
                                       int(cfg.data.seq_len)) if r.reward_model else None
        self.fn = load_reward_fn(r.reward_fn) if r.reward_fn else None

    @torch.no_grad()
    def __call__(self, r: Rollout, prompts: list[str]) -> torch.Tensor:
        if self.model is not None:
            with self.autocast():
                return self.model.score(r.tokens, r.last_real_index(), position_ids=r.position_ids,
                                        key_mask=r.key_mask).float()
        ids = r.response_ids()
        texts = [self.tok.decode([t for t in row if t not in self.tok.control.values()]) for row in ids]
        out = self.fn(prompts=list(prompts), responses=texts, response_ids=ids)
        if len(out) != len(ids):
            raise ValueError(f"rl.reward_fn returned {len(out)} rewards for {len(ids)} responses")
        return torch.tensor([float(x) for x in out], dtype=torch.float32, device=r.tokens.device)


def mentions_module(prompts: list[str], responses: list[str], **_) -> list[float]:
    """A verifiable reward for the shipped Python Q&A prompts: 1 when the reply names the
    module or function the question asks about (the text between the prompt's first pair of
    backticks), else 0."""
    out = []
    for p, r in zip(prompts, responses):
        parts = p.split("`")
        name = parts[1] if len(parts) > 2 else ""
        key = name.split(".")[0].rstrip("()") if name else ""
        out.append(1.0 if key and key in r else 0.0)
    return out
