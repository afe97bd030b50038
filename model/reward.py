"""The reward model: a scalar head on the causal LM (Bradley-Terry reward modelling,
launch/reward.py; read by launch/score_rewards.py).

A ``ValueModel`` (model/value_head.py: the LM with the scalar head ``value.weight``, which
PPO's critic is too): backends shard it as the LM, a language-model checkpoint loads by the
same names, and a reward checkpoint loads whole into a critic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.llama import Transformer
from model.value_head import ValueModel


class RewardModel(ValueModel):
    """A scalar reward on the last real token of prompt + reply (Bradley-Terry reward model).

    The LM output layer is unused (frozen unless tied). Called with rows chosen-then-rejected and
    ``last_index``, it returns (rewards, loss) with loss -log sigmoid(r_c - r_r - margin)."""

    def __init__(self, cfg, margin: float = 0.0, **kw):
        super().__init__(cfg, **kw)
        self.margin = margin
        # A fresh reward head starts small and random (pairs must differ from step 1), where a
        # fresh critic starts at 0.
        torch.nn.init.normal_(self.value.weight, mean=0.0, std=cfg.init_std)

    def forward(self, tokens, targets=None, last_index=None, pairs: bool = True, **kw):
        if kw.get("kv_caches") is not None or (targets is None and last_index is None):
            return Transformer.forward(self, tokens, targets, **kw)  # the plain LM (generation)
        h = Transformer.forward(self, tokens, return_hidden=True, **kw)
        B, T = tokens.shape
        if last_index is None:
            last_index = torch.full((B,), T - 1, device=tokens.device)
        rewards = self.value(h[torch.arange(B, device=tokens.device), last_index]).squeeze(-1).float()
        if not pairs:
            return rewards, None
        half = B // 2
        loss = -F.logsigmoid(rewards[:half] - rewards[half:] - self.margin).mean()
        return rewards.detach(), loss
