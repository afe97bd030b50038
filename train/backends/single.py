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

    def export_trainable(self) -> FullState:
        """Only the trained parameters (LoRA adapters, a head) and their moments."""
        names = [n for n, p in self.raw_model.named_parameters() if p.requires_grad]
        moments, step = adamw_export(self.raw_model, self.optimizer)
        params = dict(self.raw_model.named_parameters())
        return FullState(model={n: params[n].detach().cpu().clone() for n in names},
                         moments={n: m for n, m in moments.items() if n in names}, step=step)

    def import_trainable(self, st: FullState) -> None:
        params = dict(self.raw_model.named_parameters())
        with torch.no_grad():
            for n, t in st.model.items():
                params[n].copy_(t)
        adamw_import(self.raw_model, self.optimizer, st.moments, st.step)

    def save(self, directory: str) -> None:
        if self.is_main:
            self.export_full().save(directory)

    def load(self, directory: str, meta: dict) -> None:
        st = read_full_state(directory, self.raw_model)
        self.raw_model.load_state_dict(st.model)
        adamw_import(self.raw_model, self.optimizer, st.moments, st.step)
