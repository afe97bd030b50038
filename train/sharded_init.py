"""Build a model that never exists whole on one rank.

A sharding backend (FSDP, DeepSpeed ZeRO-3) asks for the model to be built inside
``deferred(backend)``: on the meta device for FSDP (no storage at all; ``fully_shard`` then
allocates each rank's shard), or under DeepSpeed's ``zero.Init`` (each layer is partitioned
as soon as it is built). The backend then fills only its local slice of every parameter
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

import contextlib
import math

import torch

from model.llama import init_rows


def builds_deferred(backend) -> bool:
    """Whether ``backend`` takes a model built without its weights (see ``deferred``)."""
    if backend.name == "fsdp":
        return True
    return backend.name == "deepspeed" and int(backend.cfg.backend.zero_stage) == 3


def deferred(backend):
    """Context to build the model in, for ``backend``: the meta device (FSDP), zero.Init
    (ZeRO-3), or nothing (the other backends hold the whole model anyway)."""
    if backend.name == "fsdp":
        return torch.device("meta")
    if builds_deferred(backend):
        import deepspeed

        from train.backends.deepspeed import build_ds_config

        ds = build_ds_config(backend.cfg, backend.bf16)
        remote = "cpu" if backend.cfg.backend.offload_params else None
        # dtype=None: zero.Init takes the parameters' dtype from the config, as the engine
        # does. An explicit dtype goes through DeepSpeed's fallback instead (since 0.14.1,
        # still in 0.19.8), ``dtype or torch.float16 if accelerator.is_fp16_supported() else
        # torch.bfloat16 if ...``, which Python reads as ``(dtype or fp16) if fp16 else bf16``:
        # where fp16 is unsupported (CPUs without AVX512-FP16/AMX-FP16, and every CPU before
        # DeepSpeed 0.16.8) it ignores the dtype asked for and partitions fp32 training in bf16.
        init = deepspeed.zero.Init(config_dict_or_path=ds, remote_device=remote, dtype=None)
        want = zero3_dtype(ds)
        if getattr(init, "dtype", want) != want:
            raise RuntimeError(f"DeepSpeed's zero.Init would build the parameters in {init.dtype}, not the "
                               f"{want} this run trains in")
        return init
    return contextlib.nullcontext()


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
    rows = init_rows(model.init_seed, name, shape, model.init_std(name), r0, r1).reshape(-1)
    with torch.no_grad():
        flat[:n].copy_(rows[first - r0 * cols: first - r0 * cols + n])


def is_deferred(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built without weights: on the meta device."""
    return any(p.is_meta for p in model.parameters())


def init_fsdp_shards(model: torch.nn.Module, device: torch.device, buffer_device: torch.device) -> None:
    """Materialise a meta-built, ``fully_shard``-ed model on ``device`` (the CPU when
    parameters are offloaded) with its buffers on ``buffer_device``, and initialise each
    rank's row shard (FSDP2 shards dim 0 in chunks of ceil(rows / ranks))."""
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        offset = 0
        for mesh_dim, placement in enumerate(p.placements):
            if placement.is_shard():
                if placement.dim != 0:
                    raise ValueError(f"{name}: sharded on dim {placement.dim}; kiln's init fills dim-0 shards")
                ranks = p.device_mesh.size(mesh_dim)
                offset = p.device_mesh.get_coordinate()[mesh_dim] * math.ceil(p.shape[0] / ranks)
        first = min(offset, p.shape[0]) * math.prod(p.shape[1:])
        fill_slice(model, name, tuple(p.shape), p.to_local().view(-1), first)
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(buffer_device)
    model.reset_buffers()


def init_zero3_partitions(model: torch.nn.Module) -> None:
    """Initialise each rank's ZeRO-3 partition of a model built under ``zero.Init``: a
    parameter's flat elements are cut into equal partitions, rank r holding the r-th."""
    import torch.distributed as dist

    for name, p in model.named_parameters():
        part = p.ds_tensor
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None))  # the rank within its partition group
        fill_slice(model, name, tuple(p.ds_shape), part.view(-1), rank * part.numel())
    model.reset_buffers()  # zero.Init made the rotary tables in its dtype (bf16 with bf16 training)
