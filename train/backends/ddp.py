"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced.

Checkpoints are the portable full form written by rank 0, identical to a single-device
checkpoint, so DDP runs resume on any number of ranks.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from train.backends.base import init_distributed
from train.backends.single import SingleBackend
from train.optim import build_adamw


class DDPBackend(SingleBackend):
    name = "ddp"

    def __init__(self, cfg):
        super().__init__(cfg)
        init_distributed(self)

    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = model.to(self.device)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = DDP(self.raw_model, device_ids=ids) if self.world_size > 1 else self.raw_model
        self.optimizer = build_adamw(self.raw_model, self.cfg.optim, self.device)

    def micro_step_context(self, is_last: bool):
        if isinstance(self.model, DDP) and not is_last:
            return self.model.no_sync()
        return super().micro_step_context(is_last)
