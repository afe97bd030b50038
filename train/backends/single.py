"""One process, one device. Also the reference the distributed backends are tested against."""

from __future__ import annotations

import torch

from train.backends.base import Backend
from train.checkpoint.full_state import FullState, adamw_export, adamw_import, read_full_state
from train.checkpoint.writing import Writing, background_writer
from train.optim import build_adamw


class SingleBackend(Backend):
    name = "single"
    holds_plain_modules = True  # and DDPBackend's: DDP wraps the module, its tensors untouched

    def setup(self, model: torch.nn.Module) -> None:
        self.raw_model = model.to(self.device)
        self.model = self.raw_model
        self.optimizer = build_adamw(self.raw_model, self.cfg.optim, self.device)


    def export_full(self, trainable_only: bool = False) -> FullState:
        moments, step = adamw_export(self.raw_model, self.optimizer)
        if not trainable_only:
            return FullState(model=self.raw_model.state_dict(), moments=moments, step=step)
        trained = {n: p for n, p in self.raw_model.named_parameters() if p.requires_grad}
        return FullState(model={n: p.detach().cpu().clone() for n, p in trained.items()},
                         moments={n: m for n, m in moments.items() if n in trained}, step=step)

    def import_full(self, st: FullState | None, partial: bool = False) -> None:
        st = self.full_state_from_main(st)
        if partial:
            params = dict(self.raw_model.named_parameters())
            with torch.no_grad():
                for n, t in st.model.items():
                    params[n].copy_(t)
        else:
            self.raw_model.load_state_dict(st.model)
        adamw_import(self.raw_model, self.optimizer, st.moments, st.step)

    def save(self, directory: str, background: bool = False) -> Writing:
        if not self.is_main:
            return Writing()
        st = self.export_full()
        if not background:
            st.save(directory)
            return Writing()
        # A host copy first (state_dict aliases the live parameters), then the thread writes it.
        st.model = {k: v.detach().to("cpu", copy=True) for k, v in st.model.items()}
        return Writing(background_writer().submit(st.save, directory))

    def load(self, directory: str, meta: dict) -> None:
        self.import_full(self.on_main(f"reading {directory}", lambda: read_full_state(directory, self.raw_model)))
