"""Build a model that never exists whole on one rank.

A sharding backend (FSDP, DeepSpeed ZeRO-3: ``backend.builds_deferred``) has the model built
inside its ``backend.model_init_context()``: the meta device for FSDP (no storage at all;
``fully_shard`` then allocates each rank's shard), DeepSpeed's ``zero.Init`` for ZeRO-3
(each layer is partitioned as soon as it is built). The backend decides; this module only
knows how to fill what was deferred. The backend then fills only its local slice of every parameter
with ``fill_slice``, which draws exactly the values a one-process build with the same seed
would hold there (``model.llama.init_rows``). Peak host memory while launching is one
rank's shard plus one block of rows, not the model: the 7B config would otherwise cost 27 GB
per rank before sharding.

The backends that hold the whole model (single, DDP, ZeRO-1/2) get it from ``build_on_device``:
built on the meta device, allocated once on the training device (``to_empty``) and filled
there, parameter by parameter, with the same values. Nothing is built on the host and then
copied, and torch's default initialisation, which ``init_rows`` overwrites anyway, never runs.
"""

from __future__ import annotations

import math

import torch

from model.llama import init_rows


def build_on_device(model_cls, model_cfg, device: torch.device) -> torch.nn.Module:
    """``model_cls(model_cfg)`` with its initial weights made on ``device``: the same tensors
    as ``model_cls(model_cfg)`` on the CPU from the same global seed."""
    with torch.device("meta"):
        model = model_cls(model_cfg, init_weights=False)
    first_name: dict[int, str] = {}
    aliases = [(name, first_name.setdefault(id(p), name))
               for name, p in model.named_parameters(remove_duplicate=False)]
    model.to_empty(device=device)  # new Parameters from the meta ones: tied weights come apart
    for name, first in aliases:
        if name != first:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    for name, p in model.named_parameters():  # tied weights once
        fill_slice(model, name, tuple(p.shape), p.data.view(-1), 0)
    model.reset_buffers()
    return model


def zero3_dtype(ds_config: dict) -> torch.dtype:
    """The dtype ZeRO-3 holds parameters in for DeepSpeed config ``ds_config``: bf16 or fp16
    where enabled, else fp32."""
    if (ds_config.get("bf16") or ds_config.get("bfloat16") or {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def fill_slice(model: torch.nn.Module, name: str, shape: tuple, flat: torch.Tensor, first: int) -> None:
    """Write parameter ``name``'s initial values at flat (row-major) positions ``first`` ...
    into ``flat`` (1-D; entries past the parameter's end, i.e. padding, are left alone)."""
    total = math.prod(shape)
    n = max(0, min(flat.numel(), total - first))
    if n == 0:
        return
    cols = total // shape[0]
    r0, r1 = first // cols, (first + n + cols - 1) // cols
    with torch.no_grad():
        if n == total and flat.is_contiguous():  # the whole parameter: drawn where it lives when it can be
            init_rows(model.init_seed, name, shape, model.init_std(name), 0, shape[0], out=flat[:n].view(shape))
            return
        rows = init_rows(model.init_seed, name, shape, model.init_std(name), r0, r1).reshape(-1)
        flat[:n].copy_(rows[first - r0 * cols: first - r0 * cols + n])


def is_deferred(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built without weights: on the meta device."""
    return any(p.is_meta for p in model.parameters())


def init_fsdp_shards(model: torch.nn.Module, device: torch.device, buffer_device: torch.device) -> None:
    """Materialise a meta-built, ``fully_shard``-ed model on ``device`` (the CPU when
    parameters are offloaded) with its buffers on ``buffer_device``, and initialise each
    rank's part of every parameter: FSDP2 shards dim 0 in chunks of ceil(rows / ranks);
    under tensor parallelism (train/parallel/) a part is a block of rows and columns
    (``local_block``)."""
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        local = p.to_local()
        if local.numel() == 0:
            continue
        (r0, c0), (rows, cols) = local_block(p)
        if c0 == 0 and cols == math.prod(p.shape[1:]):  # whole rows: fill the flat range directly
            fill_slice(model, name, tuple(p.shape), local.view(-1), r0 * cols)
            continue
        block = init_rows(model.init_seed, name, tuple(p.shape), model.init_std(name), r0, r0 + rows)
        with torch.no_grad():
            local.copy_(block.reshape(rows, -1)[:, c0:c0 + cols].reshape(local.shape))
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(buffer_device)
    model.reset_buffers()


def local_block(p) -> tuple[tuple[int, int], tuple[int, int]]:
    """((first row, first column), (rows, columns)) of the part of DTensor parameter ``p``
    this rank holds, columns counted over the flattened trailing dims. DTensor's own layout
    arithmetic (which also knows FSDP's strided shards of a tensor-parallel split) decides."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if len(p.shape) > 2 and any(offset[2:]):
        raise ValueError("parameters of more than 2 dims are sharded on dim 0 or 1 only by kiln's init")
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (offset[0], offset[1] if len(offset) > 1 else 0), (shape[0], cols)


def init_zero3_partitions(model: torch.nn.Module) -> None:
    """Initialise each rank's ZeRO-3 partition of a model built under ``zero.Init``: a
    parameter's flat elements are cut into equal partitions, rank r holding the r-th."""
    import torch.distributed as dist

    for name, p in model.named_parameters():
        part = p.ds_tensor
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))  # the rank within its partition group
        fill_slice(model, name, tuple(p.ds_shape), part.view(-1), rank * part.numel())
    model.reset_buffers()  # zero.Init made the rotary tables in its dtype (bf16 with bf16 training)
