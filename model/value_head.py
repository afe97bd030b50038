"""A scalar head on the causal LM: PPO's critic, and the scorer of a kiln reward model.

A ``Transformer`` subclass (like ``model.classifier``) whose one new parameter is
``value.weight`` -- the name launch/reward.py's reward model gives its head -- so a reward
checkpoint loads into it whole (critic initialised from the reward model), and an LM or
SFT checkpoint loads with a fresh head (critic initialised from the policy). The head reads
every position's final hidden state: ``forward`` returns (B, T) values, and the value at a
row's last real token is the reward model's score of that row. The LM output layer is
unused, hence frozen unless tied to the embedding.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.llama import ModelConfig, Transformer

VALUE_HEAD = "value"


class ValueModel(Transformer):
    def __init__(self, cfg: ModelConfig, **kw):
        super().__init__(cfg, **kw)
        self.value = nn.Linear(cfg.d_model, 1, bias=False)
        if not self.value.weight.is_meta:
            nn.init.zeros_(self.value.weight)  # a fresh critic predicts 0 until it has seen returns
        if not cfg.tie_embeddings:
            self.output.weight.requires_grad = False

    @staticmethod
    def extra_parameter_names() -> set[str]:
        return {f"{VALUE_HEAD}.weight"}

    def forward(self, tokens: torch.Tensor, targets=None, **kw) -> torch.Tensor:
        """(B, T) values in fp32; ``position_ids`` / ``key_mask`` as for the LM."""
        h = super().forward(tokens, return_hidden=True, **kw)
        return self.value(h).squeeze(-1).float()

    def score(self, tokens: torch.Tensor, last_index: torch.Tensor, **kw) -> torch.Tensor:
        """(B,) the value at each row's ``last_index``: a reward model's score of the row."""
        values = self(tokens, **kw)
        return values[torch.arange(len(tokens), device=tokens.device), last_index]
