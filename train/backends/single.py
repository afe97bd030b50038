"""One process, one device. Also the reference the distributed backends are tested against."""

from __future__ import annotations

import torch

from train.backends.base import Backend
from train.full_state import FullState, adamw_export, adamw_import, read_full_state
from train.optim import build_adamw


class SingleBackend(Backend):
    name = "single"

    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = model.to(self.device)
        self.model = self.raw_model
        self.optimizer = build_adamw(self.raw_model, self.cfg.optim, self.device)


    def export_full(self) -> FullState:
        moments, step = adamw_export(self.raw_model, self.optimizer)
        return FullState(model=self.raw_model.state_dict(), moments=moments, step=step)

    def save(self, directory: str) -> None:
        if self.is_main:
            self.export_full().save(directory)

    def load(self, directory: str, meta: dict) -> None:
        st = read_full_state(directory, self.raw_model)
        self.raw_model.load_state_dict(st.model)
        adamw_import(self.raw_model, self.optimizer, st.moments, st.step)
