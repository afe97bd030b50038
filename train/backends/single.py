"""One process, one device. Also the reference the distributed backends are tested against."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_model, save_model

from train.backends.base import Backend
from train.checkpoint import torch_load
from train.optim import build_adamw


class SingleBackend(Backend):
    name = "single"

    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = model.to(self.device)
        self.model = self.raw_model
        self.optimizer = build_adamw(self.raw_model, self.cfg.optim, self.device)

    def step(self, lr: float, max_norm: float) -> float:
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, directory: str) -> None:
        if self.is_main:
            save_model(self.raw_model, os.path.join(directory, "model.safetensors"))
            torch.save(self.optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))

    def load(self, directory: str, meta: dict) -> None:
        weights = os.path.join(directory, "model.safetensors")
        if not os.path.exists(weights):
            raise FileNotFoundError(
                f"{directory} has no model.safetensors (written by backend {meta.get('backend')!r}); "
                "consolidate it first with launch/convert_checkpoint.py")
        load_model(self.raw_model, weights, device=str(self.device))
        opt = os.path.join(directory, "optimizer.pt")
        if os.path.exists(opt):
            self.optimizer.load_state_dict(torch_load(opt, map_location=self.device))
