"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced.

Checkpoints are the portable full form written by rank 0, identical to a single-device
checkpoint, so DDP runs resume on any number of ranks.
"""

from __future__ import annotations

import inspect

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from train.backends.base import init_distributed
from train.backends.single import SingleBackend
from train.optim import build_adamw


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DDP:
    """DDP as kiln runs it. No buffer broadcast before each forward: kiln's buffers (the
    rotary tables, a classifier's class weights) are computed from the config identically on
    every rank and never trained, so re-broadcasting them from rank 0 before every forward
    is a collective that changes nothing. ``gradient_as_bucket_view=True``: each ``.grad``
    is a view into DDP's all-reduce bucket instead of a second copy of the gradients (one
    model's worth of memory and a copy per step saved); kiln only scales grads in place
    (clipping) and sets them to None after the step (DDP points them at the buckets again
    at the next backward)."""
    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids, gradient_as_bucket_view=True, **no_buffer_sync_in_forward())


def no_buffer_sync_in_forward() -> dict:
    """The DDP argument that stops the per-forward buffer broadcast: ``forward_sync_buffers``
    from torch 2.13 (which deprecates ``broadcast_buffers`` with a FutureWarning, and still
    broadcasts the buffers once at construction), ``broadcast_buffers`` before it."""
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class DDPBackend(SingleBackend):
    name = "ddp"

    def __init__(self, cfg):
        super().__init__(cfg)
        init_distributed(self)

    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = model.to(self.device)
        self.model = wrap_ddp(self.raw_model, self.device) if self.world_size > 1 else self.raw_model
        self.optimizer = build_adamw(self.raw_model, self.cfg.optim, self.device)

    def micro_step_context(self, is_last: bool):
        if isinstance(self.model, DDP) and not is_last:
            return self.model.no_sync()
        return super().micro_step_context(is_last)
