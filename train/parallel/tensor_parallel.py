"""Tensor parallelism for the Llama blocks (Megatron-LM's split, through DTensor's
``parallelize_module``), applied from outside the model before ``fully_shard``.

Per block: attention ``wq``/``wk``/``wv`` and the MLP's ``w1`` (gate) / ``w3`` (up) are split
by output features (column-wise): each tensor-parallel rank computes whole heads and a slice
of the hidden layer from the full input; ``wo`` and ``w2`` are split by input features
(row-wise) and all-reduce their partial outputs. Two all-reduces per block forward (two
more in backward), none inside attention. Between projections every rank holds plain local
tensors: the attention reshapes take the local head count from the tensor (``view(..., -1,
head_dim)``), so the model needs no knowledge of the split.

What is *not* done, and why:

- Sequence parallelism (norms and the residual stream split along the sequence between
  blocks): it saves the (1 - 1/tp) share of the norm and residual activations, but turns the
  all-reduces into all-gather + reduce-scatter pairs around DTensor-typed activations, which
  every caller of the blocks (rotary tables, masks, KV caches, activation checkpointing)
  would have to handle; activation checkpointing already keeps only block inputs. The
  norms, the embedding and the output layer are replicated across the tensor-parallel
  group (and sharded by FSDP across data-parallel ranks like every other parameter).
- Loss parallel (the output layer split over the vocabulary, the loss computed on vocabulary
  shards): the loss already runs in chunks of ``model.loss_chunk`` positions, recomputed in
  backward (model/llama.py: chunked_cross_entropy), so the full logits never exist; a
  vocabulary-parallel loss would need its own chunked, vocabulary-sharded log-softmax.

Replicated parameters still get the same gradient on every tensor-parallel rank (each
computes it from the same full activations), so no extra reduction is needed for them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from train.errors import ConfigError

BLOCK_PLAN = {
    "attn.wq": "colwise", "attn.wk": "colwise", "attn.wv": "colwise", "attn.wo": "rowwise",
    "mlp.w1": "colwise", "mlp.w3": "colwise", "mlp.w2": "rowwise",
}


def apply_tensor_parallel(model: nn.Module, mesh) -> None:
    """Split every block of ``model`` over the 1-D tensor-parallel ``mesh`` (in place). The
    projections must be plain ``nn.Linear`` (a LoRA-wrapped one is a ConfigError)."""
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for i, block in enumerate(model.layers):
        plan = {}
        for path, style in BLOCK_PLAN.items():
            module = block.get_submodule(path)
            if type(module) is not nn.Linear:
                raise ConfigError("backend.tp", f"layers.{i}.{path} is a {type(module).__name__}, not a plain "
                                                "Linear: tensor parallelism splits plain projections only")
            plan[path] = styles[style]()
        parallelize_module(block, mesh, plan)


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether some parameter of ``model`` is split across a tensor-parallel mesh dimension."""
    for p in model.parameters():
        names = getattr(getattr(p, "device_mesh", None), "mesh_dim_names", None) or ()
        if "tp" in names:
            return True
    return False


def grad_norm(params: list) -> torch.Tensor:
    """The global 2-norm of the gradients of ``params``, a plain tensor: parameters split over
    the (data, tensor) mesh and those over the data mesh only are DTensors of two meshes,
    which torch's ``get_total_norm`` cannot stack, so each mesh's norm is made whole
    (``full_tensor``: the sum of squares over its shards) and the results are combined."""
    by_mesh: dict = {}
    for p in params:
        by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    squares = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    return torch.stack(squares).sum().sqrt()


def clip_grads(params: list, max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` for parameters on several meshes (see ``grad_norm``); returns the
    pre-clip norm. ``max_norm`` <= 0 only measures."""
    norm = grad_norm(params)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef.to(p.grad.device))
    return norm
