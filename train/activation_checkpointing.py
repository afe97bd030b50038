"""Recompute each transformer block in the backward pass instead of storing activations.

Applied from outside the model by replacing each block's ``forward``, so parameter names
(and therefore checkpoints) are unchanged and FSDP/DeepSpeed wrap the same modules.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module) -> None:
    for block in model.layers:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
