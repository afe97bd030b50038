"""Rollouts: batched sampling from the policy, and the masks that keep the arithmetic honest.

Sampling is ``model.llama.generate`` (KV cache, left-padded prompts, temperature, top-p,
stop ids, ``return_logprobs``): the log-prob of every sampled token is recorded at sampling
time, under softmax(logits / temperature) before top-p truncation, the same distribution
``response_logprobs`` recomputes in training. A rollout is laid out as

    [left padding | prompt | response tokens ... first stop token | after-stop filler]

with ``key_mask`` True on real tokens only (prompt and response through the first stop) and
per-row ``position_ids`` counting real tokens, so a row's log-probs, values and reward are
those of the row alone. ``response_mask`` (B, N) is True on response tokens through the
first stop (the stop token is an action the policy took; a row cut at ``max_new_tokens``
has no stop): it is the only thing any log-prob sum, KL, advantage or loss looks at, and the
reward is read at its last True position. Prompt tokens, padding and everything after the
stop never enter.

Under a sharded backend the parameters are gathered once for the whole batch
(``gathered_for_generation``): FSDP2 unshards every block and the root once and keeps them
unsharded through every decoding step (one all-gather per module per batch, where FSDP's own
hooks gather every block at every step: tests/test_rl_fsdp_rollout.py counts both), then
reshards them and puts back each module's reshard-after-forward setting. Ranks may then also
stop decoding at different steps (no collective runs inside the batch). ZeRO-3 gathers all
parameters with ``deepspeed.zero.GatheredParameters`` and takes its engine's per-module
hooks off for the batch (``zero3_offload``, the engine's ``DeepSpeedZeRoOffload``, owner of
those hooks), as TRL's ``ds3_gather_for_generation`` does: with the hooks on, each module's
forward frees what ``GatheredParameters`` gathered and the next decoding step gathers it
again, so the batch paid every per-step gather plus one, and a rank whose rows all stopped
early left the others waiting in a gather. tests/test_rl_zero3_rollout.py counts the
elements gathered both ways.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from model.llama import generate


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P + N) left-padded prompts, then responses
    key_mask: torch.Tensor  # (B, P + N) True on real tokens
    position_ids: torch.Tensor  # (B, P + N)
    response_mask: torch.Tensor  # (B, N) True through the first stop token
    logprobs: torch.Tensor  # (B, N) sampling-time log-probs, 0 off the mask
    prompt_len: int  # P, the padded prompt width

    @property
    def responses(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_len:]

    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def last_real_index(self) -> torch.Tensor:
        """(B,) position in ``tokens`` of each row's last real token: where a reward is read."""
        return self.prompt_len + self.response_lengths() - 1

    def response_ids(self) -> list[list[int]]:
        """Each row's response through its first stop, as a list (what a reward function sees)."""
        return [row[m].tolist() for row, m in zip(self.responses, self.response_mask)]

    def select(self, rows) -> Rollout:
        return Rollout(self.tokens[rows], self.key_mask[rows], self.position_ids[rows], self.response_mask[rows],
                       self.logprobs[rows], self.prompt_len)


def response_mask(responses: torch.Tensor, stop_ids) -> torch.Tensor:
    """True on each row's tokens up to and including its first stop id (all of a row without one)."""
    stop = torch.tensor(list(stop_ids), device=responses.device)
    is_stop = torch.isin(responses, stop).long()
    stops_before = is_stop.cumsum(1) - is_stop  # stop tokens strictly before this position
    return stops_before == 0


def build_rollout(prompts: list[list[int]], responses: torch.Tensor, logprobs: torch.Tensor, stop_ids,
                  pad_id: int) -> Rollout:
    """The padded layout and masks of ``prompts`` and their sampled ``responses`` (B, N)."""
    device = responses.device
    P = max(len(p) for p in prompts)
    B, N = responses.shape
    prompt_rows = torch.tensor([[pad_id] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    prompt_real = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts], device=device)
    rmask = response_mask(responses, stop_ids)
    filled = torch.where(rmask, responses, torch.full_like(responses, pad_id))
    key_mask = torch.cat([prompt_real, rmask], dim=1)
    position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)
    return Rollout(torch.cat([prompt_rows, filled], dim=1), key_mask, position_ids, rmask,
                   logprobs * rmask.to(logprobs.dtype), P)


@contextlib.contextmanager
def gathered_for_generation(model: torch.nn.Module, zero3_offload=None):
    """Parameters whole for the duration of a rollout batch (see module docstring); a no-op
    for a model that is not sharded. A ZeRO-3 model needs ``zero3_offload``, its engine's
    hook owner (``Backend.zero3_offload``)."""
    fsdp = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "set_reshard_after_forward")]
    if fsdp:  # FSDP2 (fully_shard): one all-gather per module for the whole batch
        # FSDP decides the root's own setting at its lazy init (the first forward): run it now,
        # so what is saved and restored below is the setting training uses.
        fsdp[0]._get_fsdp_state()._lazy_init()
        states = [m._get_fsdp_state() for m in fsdp]
        saved = [(st._auto_reshard_after_forward, [g.post_forward_mesh_info for g in st._fsdp_param_groups])
                 for st in states]
        for m in fsdp:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m, st, (auto, infos) in zip(fsdp, states, saved):
                st._auto_reshard_after_forward = auto
                for g, info in zip(st._fsdp_param_groups, infos):
                    g.post_forward_mesh_info = info
                m.reshard()
        return
    zero3 = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        if zero3_offload is None:
            raise ValueError("a ZeRO-3 model is gathered for generation with its engine's zero3_offload "
                             "(Backend.zero3_offload): its hooks would free each gathered module after its forward")
        off = zero3_offload
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            for p in zero3:
                p.ds_active_sub_modules.clear()
            # every hook off: the per-module fetch/release ones and the root's start-of-forward
            # one, whose trace check is a collective at each forward
            start = off.module._forward_pre_hooks[off.fwd_pre_hook.id]
            for h in [off.fwd_pre_hook, *off.forward_hooks, *off.backward_hooks]:
                h.remove()
            off.forward_hooks, off.backward_hooks = [], []
            try:
                yield
            finally:  # back in their original order
                off.fwd_pre_hook = off.module.register_forward_pre_hook(start)
                off._register_deepspeed_module(off.module)
        return
    yield


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
           top_p: float, stop_ids, pad_id: int, generator: torch.Generator | None, device: torch.device,
           autocast=contextlib.nullcontext, zero3_offload=None) -> Rollout:
    """One batch of responses to ``prompts`` (token-id lists), with sampling-time log-probs;
    ``zero3_offload``: see ``gathered_for_generation``."""
    with gathered_for_generation(model, zero3_offload), autocast():
        out, logps = generate(model, prompts, max_new_tokens, temperature=temperature,
                              top_p=top_p if top_p < 1.0 else None, eos_id=list(stop_ids), generator=generator,
                              device=device, return_logprobs=True)
    if out.shape[1] < max_new_tokens:  # every row stopped early: pad to the configured width
        extra = max_new_tokens - out.shape[1]
        out = torch.cat([out, out.new_full((out.shape[0], extra), list(stop_ids)[0])], dim=1)
        logps = torch.cat([logps, logps.new_zeros(logps.shape[0], extra)], dim=1)
    return build_rollout(prompts, out, logps.float(), stop_ids, pad_id)


def response_logits(model: torch.nn.Module, r: Rollout) -> torch.Tensor:
    """Logits at the positions that predict the response tokens: (B, N, V)."""
    logits, _ = model(r.tokens, position_ids=r.position_ids, key_mask=r.key_mask)
    P, N = r.prompt_len, r.response_mask.shape[1]
    return logits[:, P - 1: P + N - 1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) of ``tokens``, in fp32: (B, N, V), (B, N) -> (B, N)."""
    scaled = logits.float() / temperature if temperature > 0 else logits.float()
    return torch.log_softmax(scaled, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(model: torch.nn.Module, r: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs of the responses, their logits) under ``model``, 0 off the mask."""
    logits = response_logits(model, r)
    lp = token_logprobs(logits, r.responses, temperature)
    return lp * r.response_mask.to(lp.dtype), logits
