"""Preference optimisation, the parts every trainer shares: pairs, sequence log-probs, losses.

A preference record is a prompt (text, or chat messages ending with a user turn) with a
chosen and a rejected reply. Both replies are encoded after the *same* prompt ids, with the
same truncation policy: if prompt + reply exceeds ``seq_len`` the reply is cut (both are
cut the same way and counted); if the prompt alone leaves no room for a reply the pair is
dropped and counted. Only reply tokens (content and end-of-turn) are targets, so a
sequence log-prob is the sum over the reply: the prompt and padding never contribute.

Losses, for policy log-probs pi_c / pi_r of chosen / rejected and reference ref_c / ref_r,
h = (pi_c - ref_c) - (pi_r - ref_r):
- ``dpo``  (Rafailov et al. 2023): -log sigmoid(beta h)
- ``cdpo`` (conservative DPO, labels flipped with probability ``label_smoothing``):
  -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
- ``ipo``  (Azar et al. 2023): (h - 1 / (2 beta))^2
The implicit rewards are beta (pi - ref); reward accuracy is the share of pairs whose chosen
reward exceeds the rejected one, the margin their mean difference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.sft.chat import ROLE_TOKEN, control_ids, encode_chat

LOSSES = ("dpo", "cdpo", "ipo")


@dataclass
class PreferencePair:
    prompt: list[int]  # ids up to and including the assistant role token
    chosen: list[int]  # reply ids: content and end-of-turn
    rejected: list[int]


def prompt_messages(prompt) -> list[dict]:
    """A text prompt as one user turn; chat messages as they are (the last must be the user's)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = list(prompt)
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a preference prompt must end with a user turn")
    return messages


def encode_pair(tok, prompt, chosen: str, rejected: str, seq_len: int, counts: Counter) -> PreferencePair | None:
    """Both replies after the same prompt ids; cut to fit ``seq_len`` the same way (counted
    in ``counts``: ``truncated_pairs``, ``dropped_prompt_too_long``)."""
    ids = encode_chat(tok, prompt_messages(prompt), add_generation_prompt=True).ids
    end = control_ids(tok)["<|end_of_turn|>"]
    replies = [tok.encode(chosen) + [end], tok.encode(rejected) + [end]]
    room = seq_len + 1 - len(ids)  # a window of seq_len inputs holds seq_len + 1 tokens
    if room < 2:
        counts["dropped_prompt_too_long"] += 1
        return None
    if any(len(r) > room for r in replies):
        counts["truncated_pairs"] += 1
        replies = [r[:room] for r in replies]
    assert ids[-1] == control_ids(tok)[ROLE_TOKEN["assistant"]]
    return PreferencePair(ids, *replies)


def pair_rows(pair: PreferencePair) -> list[tuple[list[int], list[int]]]:
    """(input ids, targets) for chosen then rejected: targets are -100 except on reply tokens."""
    rows = []
    for reply in (pair.chosen, pair.rejected):
        seq = pair.prompt + reply
        targets = [-100] * (len(pair.prompt) - 1) + reply
        rows.append((seq[:-1], targets))
    return rows


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict:
    """A batch of 2B rows (chosen rows first, then rejected), right-padded; padding has
    target -100, so it never enters a log-prob."""
    rows = [r for p in pairs for r in pair_rows(p)]
    rows = rows[0::2] + rows[1::2]
    T = max(len(x) for x, _ in rows)
    inp = torch.full((len(rows), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        inp[i, :len(x)] = torch.tensor(x)
        tgt[i, :len(y)] = torch.tensor(y)
    return {"input": inp, "target": tgt}


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the positions whose target is not -100: (B, T, V), (B, T) -> (B,)."""
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str = "dpo",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs, and the implicit-reward metrics (detached floats)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r} ({' | '.join(LOSSES)})")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        eps = label_smoothing if kind == "cdpo" else 0.0
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    chosen_reward = beta * (policy_chosen - ref_chosen).detach()
    rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    metrics = {"reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
               "reward_margin": float((chosen_reward - rejected_reward).mean()),
               "chosen_reward": float(chosen_reward.mean()), "rejected_reward": float(rejected_reward.mean())}
    return losses.mean(), metrics


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, batch: dict, adapter: str | None = None,
                       reference: torch.nn.Module | None = None) -> torch.Tensor:
    """Sequence log-probs of the frozen reference for a collated batch: an explicit
    ``reference`` model, or -- for a LoRA policy -- the same model with its adapters off,
    so no second copy of the weights is held (``adapter`` is switched back on after)."""
    from model.lora import set_active_adapter

    was_training = model.training
    model.eval()
    try:
        if reference is not None:
            logits, _ = reference(batch["input"])
        else:
            set_active_adapter(model, None)
            logits, _ = model(batch["input"])
    finally:
        if reference is None and adapter is not None:
            set_active_adapter(model, adapter)
        model.train(was_training)
    return sequence_logprobs(logits, batch["target"])
