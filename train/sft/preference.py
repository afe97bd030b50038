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
- ``ipo``  (Azar et al. 2023): (h - 1 / (2 beta))^2, by default on log-probs *averaged*
  over each reply's tokens (``dpo.ipo_logps=mean``, as TRL computes IPO: policy and
  reference log-probs are divided by the reply's token count before h is formed), or on
  the summed log-probs (``dpo.ipo_logps=sum``). With the averaged form an IPO ``beta``
  tuned with TRL means the same here; ``dpo`` and ``cdpo`` always use sums, as TRL does.
The implicit rewards are beta (pi - ref), of the log-probs the loss uses; reward accuracy
is the share of pairs whose chosen reward exceeds the rejected one, the margin their mean
difference.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from train.sft.chat import ROLE_TOKEN, control_ids, encode_chat

LOSSES = ("dpo", "cdpo", "ipo")
IPO_LOGPS = ("mean", "sum")  # dpo.ipo_logps: per-reply-token average (TRL's IPO) | sum


@dataclass
class PreferencePair:
    prompt: list[int]  # ids up to and including the assistant role token
    chosen: list[int]  # reply ids: content and end-of-turn
    rejected: list[int]
    ref: tuple[float, float] = (0.0, 0.0)  # the reference's log-probs of chosen, rejected


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
        if replies[0] == replies[1]:  # the difference was cut off: nothing left to prefer
            counts["dropped_same_after_truncation"] += 1
            return None
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


def loss_logprobs(logps: torch.Tensor, targets: torch.Tensor, kind: str, ipo_logps: str = "mean") -> torch.Tensor:
    """The sequence log-probs a loss compares: for ``ipo`` with ``ipo_logps=mean`` each row's
    sum divided by its number of reply tokens (targets not -100), else the sums as given.
    Apply it to the policy's and the reference's log-probs alike."""
    if ipo_logps not in IPO_LOGPS:
        raise ValueError(f"unknown ipo_logps {ipo_logps!r} ({' | '.join(IPO_LOGPS)})")
    if kind != "ipo" or ipo_logps == "sum":
        return logps
    return logps / (targets != -100).sum(-1).clamp(min=1).to(logps.dtype)


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str = "dpo",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Mean loss over pairs, and the implicit-reward metrics (detached floats)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r} ({' | '.join(LOSSES)})")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    loss = preference_loss_only(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing)
    chosen_reward = beta * (policy_chosen - ref_chosen).detach()
    rejected_reward = beta * (policy_rejected - ref_rejected).detach()
    metrics = {"reward_accuracy": float((chosen_reward > rejected_reward).float().mean()),
               "reward_margin": float((chosen_reward - rejected_reward).mean()),
               "chosen_reward": float(chosen_reward.mean()), "rejected_reward": float(rejected_reward.mean())}
    return loss, metrics


def preference_loss_only(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, kind: str = "dpo",
                         label_smoothing: float = 0.0) -> torch.Tensor:
    """The mean loss alone, as a device tensor (no host reads: the training step uses it)."""
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if kind == "ipo":
        return ((h - 1.0 / (2.0 * beta)) ** 2).mean()
    eps = label_smoothing if kind == "cdpo" else 0.0
    return (-(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)).mean()


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, batch: dict, adapter: str | None = None,
                       reference: torch.nn.Module | None = None) -> torch.Tensor:
    """Sequence log-probs of the frozen reference for a collated batch: an explicit
    ``reference`` model, or -- for a LoRA policy -- the same model with its adapters off,
    so no second copy of the weights is held (``adapter`` is switched back on after)."""
    from model.lora import lora_modules, set_active_adapter

    net = reference if reference is not None else model
    was_training = net.training
    active = [m.active for m in lora_modules(net)] if reference is None else []
    net.eval()
    try:
        if reference is None:
            set_active_adapter(model, None)
        logits, _ = net(batch["input"])
    finally:
        for m, name in zip(lora_modules(net) if reference is None else [], active):
            m.active = name  # each adapter back as it was (``adapter``, if given, becomes active)
        if reference is None and adapter is not None:
            set_active_adapter(model, adapter)
        net.train(was_training)
    return sequence_logprobs(logits, batch["target"])


# ---- data -------------------------------------------------------------------------------

def _reply(value, where: str, key: str) -> str:
    """A reply given as text, or as chat messages whose last turn is the assistant's."""
    from train.sft.records import BadRecord

    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return str(value[-1].get("content", ""))
    raise BadRecord(where, f"{key!r} must be a non-empty string or messages ending with an assistant turn")


def to_preference(rec, where: str) -> tuple[object, str, str]:
    """(prompt text or messages, chosen, rejected) of a raw record: {prompt, chosen, rejected},
    the prompt a string or chat messages ending with a user turn; or TRL's conversational
    form, where chosen / rejected are whole conversations and the prompt is their shared start."""
    from train.sft.chat import CONTROL_STRINGS
    from train.sft.records import BadRecord

    if not isinstance(rec, dict) or "chosen" not in rec or "rejected" not in rec:
        raise BadRecord(where, "a preference record needs 'chosen' and 'rejected'")
    prompt = rec.get("prompt")
    if prompt is None and isinstance(rec["chosen"], list):
        prompt = rec["chosen"][:-1]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                 for m in prompt) or prompt[-1].get("role") != "user":
            raise BadRecord(where, "'prompt' messages must have roles system/user/assistant and end with a user turn")
    elif not (isinstance(prompt, str) and prompt.strip()):
        raise BadRecord(where, "'prompt' must be a non-empty string or chat messages")
    chosen, rejected = _reply(rec["chosen"], where, "chosen"), _reply(rec["rejected"], where, "rejected")
    texts = [prompt] if isinstance(prompt, str) else [m.get("content", "") for m in prompt]
    if any(c in t for t in [*texts, chosen, rejected] for c in CONTROL_STRINGS):
        raise BadRecord(where, "text contains a reserved chat control token")
    if chosen == rejected:
        raise BadRecord(where, "'chosen' and 'rejected' are the same reply")
    return prompt, chosen, rejected


@dataclass
class PreferenceData:
    train: list[PreferencePair]
    val: list[PreferencePair]
    counts: Counter
    skipped: object  # train.sft.records.SkipCounter


def load_preference_data(cfg, tok) -> PreferenceData:
    """Read, check, split (stable hash of the record) and encode the preference files."""
    from data_pipeline.stream import split_of
    from train.sft.records import BadRecord, SkipCounter, raw_records

    s, seq_len = cfg.sft, int(cfg.data.seq_len)
    if cfg.task == "reward":  # a reward row is the whole prompt + reply, not inputs shifted by one
        seq_len -= 1
    skipped = SkipCounter(bool(s.skip_bad_records))
    counts: Counter = Counter()
    train, val = [], []
    for path in list(s.paths):
        for where, rec in raw_records(str(path), s.source, s.hf_split):
            counts["records"] += 1
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                prompt, chosen, rejected = to_preference(rec, where)
            except BadRecord as e:
                skipped.handle(e)
                continue
            pair = encode_pair(tok, prompt, chosen, rejected, seq_len, counts)
            if pair is None:
                continue
            key = json.dumps([prompt, chosen, rejected], sort_keys=True)
            (val if split_of(key, float(s.val_fraction)) == "val" else train).append(pair)
    counts.update(train_pairs=len(train), val_pairs=len(val), skipped_bad=skipped.total)
    if not train:
        raise ValueError(f"sft.paths: no usable preference pair in {list(s.paths)} ({dict(counts)})")
    return PreferenceData(train, val, counts, skipped)


class PairStream:
    """Endless pairs, reshuffled every epoch (seeded); resumable by (epoch, index)."""

    def __init__(self, pairs: list[PreferencePair], seed: int):
        self.pairs, self.seed = pairs, seed
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, permutation)

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs)))
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self) -> PreferencePair:
        if self.index >= len(self.pairs):
            self.epoch, self.index = self.epoch + 1, 0
        pair = self.pairs[int(self._permutation()[self.index])]
        self.index += 1
        return pair

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def collate_with_reference(pairs: list[PreferencePair], pad_id: int) -> dict:
    """``collate_pairs`` plus each row's reference log-prob and the loop's counts: one loss
    unit per pair (the loss is a mean over pairs), tokens for throughput."""
    batch = collate_pairs(pairs, pad_id)
    refs = [p.ref[0] for p in pairs] + [p.ref[1] for p in pairs]
    batch["model_kwargs"] = {"ref_logps": torch.tensor(refs, dtype=torch.float64)}
    batch["loss_tokens"] = len(pairs)
    batch["tokens"] = sum(len(p.prompt) * 2 + len(p.chosen) + len(p.rejected) - 2 for p in pairs)
    return batch


def collate_reward(pairs: list[PreferencePair], pad_id: int) -> dict:
    """Prompt + reply rows (chosen first, then rejected), right-padded, each with the index of
    its last real token; one loss unit per pair."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    T = max(len(r) for r in rows)
    inp = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        inp[i, :len(r)] = torch.tensor(r)
    last = torch.tensor([len(r) - 1 for r in rows])
    return {"input": inp, "target": torch.zeros(len(rows), dtype=torch.long), "loss_tokens": len(pairs),
            "tokens": sum(len(r) for r in rows), "model_kwargs": {"last_index": last}}
