"""``SFTTrainer(cfg)``: the one loop (``train.trainer.Trainer``) with the fine-tuning task
that ``cfg.task`` names (``train.tasks.for_config``: instruction, classification,
continued pretraining, preference, reward). Kept as the name scripts and tests build a
fine-tuning run by; there is no fine-tuning subclass of the loop."""

from __future__ import annotations

from train.tasks import for_config
from train.trainer import Trainer


def SFTTrainer(cfg) -> Trainer:  # noqa: N802 (a constructor's name)
    return Trainer(cfg, for_config(cfg))
