"""A sequence classifier on the causal LM: a linear head on the last real token's hidden state.

A subclass of ``Transformer`` rather than a wrapper, so every backend shards it exactly like
the language model (FSDP wraps ``model.layers``), base checkpoints load by the same names,
and the head is just one more parameter (``score.weight``) that a LoRA checkpoint carries.
The LM output projection is unused here; unless it is tied to the embedding it is frozen,
because DDP refuses trainable parameters that get no gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.llama import ModelConfig, Transformer

HEAD = "score"


class TransformerClassifier(Transformer):
    def __init__(self, cfg: ModelConfig, num_classes: int, class_weights: Optional[list[float]] = None):
        super().__init__(cfg)
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.score = nn.Linear(cfg.d_model, num_classes, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=cfg.init_std)
        w = torch.tensor(class_weights if class_weights else [1.0] * num_classes, dtype=torch.float32)
        if len(w) != num_classes:
            raise ValueError(f"{len(w)} class weights for {num_classes} classes")
        self.register_buffer("class_weights", w, persistent=False)
        if not cfg.tie_embeddings:
            self.output.weight.requires_grad = False

    @staticmethod
    def extra_parameter_names() -> set[str]:
        """Parameters a language-model checkpoint does not have (see train.checkpoint.full_state.load_init_weights)."""
        return {f"{HEAD}.weight"}

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                last_index: Optional[torch.Tensor] = None, **kw):
        """tokens (B, T) right-padded; last_index (B,) position of each row's last real token
        (default T-1). Returns (class logits (B, C), mean class-weighted cross-entropy or None)."""
        h = super().forward(tokens, return_hidden=True, **kw)
        B, T = tokens.shape
        if last_index is None:
            last_index = torch.full((B,), T - 1, device=tokens.device)
        pooled = h[torch.arange(B, device=tokens.device), last_index]
        logits = self.score(pooled).float()
        loss = None
        if targets is not None:
            per = F.cross_entropy(logits, targets, reduction="none") * self.class_weights[targets]
            loss = per.mean()  # the loop weights it by the batch's loss_tokens = B
        return logits, loss
