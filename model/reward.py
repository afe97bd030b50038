"""The reward model: a scalar head on the causal LM (Bradley-Terry reward modelling,
launch/reward.py; read by launch/score_rewards.py).

A ``Transformer`` subclass, like ``model/classifier.py``'s classifier: backends shard it as
the LM, a language-model checkpoint loads by the same names, and ``value.weight`` is the one
new parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.llama import Transformer


class RewardModel(Transformer):
    """A scalar reward on the last real token of prompt + reply (Bradley-Terry reward model).

    The LM output layer is unused (frozen unless tied). Called with rows chosen-then-rejected and
    ``last_index``, it returns (rewards, loss) with loss -log sigmoid(r_c - r_r - margin)."""

    def __init__(self, cfg, margin: float = 0.0, **kw):
        super().__init__(cfg, **kw)
        self.margin = margin
        self.value = torch.nn.Linear(cfg.d_model, 1, bias=False)
        torch.nn.init.normal_(self.value.weight, mean=0.0, std=cfg.init_std)
        if not cfg.tie_embeddings:
            self.output.weight.requires_grad = False

    @staticmethod
    def extra_parameter_names() -> set[str]:
        return {"value.weight"}

    def forward(self, tokens, targets=None, last_index=None, pairs: bool = True, **kw):
        if kw.get("kv_caches") is not None or (targets is None and last_index is None):
            return super().forward(tokens, targets, **kw)  # the plain LM (generation)
        h = super().forward(tokens, return_hidden=True, **kw)
        B, T = tokens.shape
        if last_index is None:
            last_index = torch.full((B,), T - 1, device=tokens.device)
        rewards = self.value(h[torch.arange(B, device=tokens.device), last_index]).squeeze(-1).float()
        if not pairs:
            return rewards, None
        half = B // 2
        loss = -F.logsigmoid(rewards[:half] - rewards[half:] - self.margin).mean()
        return rewards.detach(), loss
