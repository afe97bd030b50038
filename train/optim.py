"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming needs only the step number:
there is no scheduler object whose state could drift from the optimizer's.
"""

from __future__ import annotations

import math

import torch


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, whatever a backend has done to its storage: under
    ZeRO-3's ``zero.Init`` ``p`` is an empty 1-D placeholder and the shape lives in
    ``ds_shape``; FSDP2's DTensor already reports its global shape."""
    return tuple(getattr(p, "ds_shape", p.shape))


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether AdamW decays parameter ``name``: matrices, except the token embedding (and
    the output weight when tied to it, which ``named_parameters`` lists under the
    embedding's name). Decided on the full shape, so every backend (single, DDP, FSDP,
    ZeRO 1/2/3) decays the same parameters: a per-rank shard must not change the answer."""
    return len(full_shape(p)) >= 2 and "tok_embeddings" not in name


def decay_split(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) trainable parameter names, each tensor once (tied aliases
    under their first name): the grouping ``param_groups`` gives the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # each tensor once (remove_duplicate)
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(name)
    return decay, no_decay


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D weights except embeddings; none on norm gains.

    Decaying embeddings pulls rare tokens towards zero, and decaying norm gains fights the
    normalisation; both are left alone, as in Llama and GPT-NeoX.
    """
    params = dict(model.named_parameters())
    decay, no_decay = decay_split(model)
    return [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]


def adamw_kwargs(cfg, device: torch.device) -> dict:
    """torch AdamW's keyword arguments for ``optim.*`` on ``device``: the one place kiln
    decides fused AdamW. ``optim.fused`` unset means fused on CUDA and on the CPU (one kernel
    per parameter instead of a dozen element-wise passes: -8% of a step of the tiny model on
    this 2-core CPU, benchmarks/bench_train.py)."""
    fused = cfg.fused
    if fused is None:
        fused = device.type in ("cuda", "cpu")
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if fused:
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = device.type == "cuda"
    return kwargs


def build_adamw(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **adamw_kwargs(cfg, device))


def lr_at(step: int, cfg, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    cosine: linear warmup, then cosine from lr to lr*min_lr_ratio at max_steps.
    wsd: warmup, constant ("stable"), then linear decay over the last decay_fraction of
    the steps (MiniCPM, Hu et al. 2024). constant: warmup then flat.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_fraction * max_steps)))
        start = max_steps - decay_steps
        if step < start:
            return peak
        frac = min(1.0, (step - start + 1) / decay_steps)
        return peak + (floor - peak) * frac
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
