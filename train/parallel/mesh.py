"""The FSDP backend's device mesh: data-parallel dimensions (``replicate`` for hybrid
shard, ``shard`` for FSDP) and, with ``backend.tp`` > 1, a tensor-parallel dimension ``tp``.

Ranks are laid out with ``tp`` innermost (rank = data rank * tp + tp rank), as torchtitan
does: the ranks of one tensor-parallel group are neighbours, i.e. on one node, where the
per-layer all-reduces of tensor parallelism have the fastest links.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.errors import ConfigError

# What torch.distributed.tensor.experimental.context_parallel raised around CPU attention (2 gloo
# processes, torch 2.13): the reason kiln has no context-parallel dimension yet.
CP_CPU_ERROR = ("aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy "
                "registered")


@dataclass
class Layout:
    """How ``world`` ranks split into data-parallel replicas x shards x tensor-parallel ranks."""

    world: int
    tp: int = 1
    replicate: int = 1  # hybrid shard: replicas (nodes); 1 without it
    hybrid: bool = False  # backend.hybrid_shard: the mesh has a replicate dim (even of size 1)

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the ranks that read different micro-batches."""
        return self.world // self.tp

    @property
    def shard(self) -> int:
        return self.dp // self.replicate

    def dp_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp


def layout(cfg, world: int) -> Layout:
    """The layout ``cfg.backend`` asks for on ``world`` ranks; a ConfigError naming the key
    when it does not fit (also run by config validation, before any work)."""
    b, m = cfg.backend, cfg.model
    tp = int(getattr(b, "tp", 1))
    if tp < 1:
        raise ConfigError("backend.tp", f"must be >= 1, got {tp}")
    cp = int(getattr(b, "cp", 1))
    if cp != 1:
        raise ConfigError("backend.cp", f"context parallelism is not implemented (got {cp}): torch's context_parallel "
                                        "does not run on a CPU, where kiln is tested (torch 2.13: "
                                        f"{CP_CPU_ERROR})")
    if tp > 1:
        if b.name != "fsdp":
            raise ConfigError("backend.tp", f"tensor parallelism runs under backend=fsdp, not backend={b.name}")
        if "sft" in cfg:
            raise ConfigError("backend.tp", "fine-tuning (launch/sft.py) does not run tensor-parallel: its data "
                                            "sharding, LoRA adapters and heads are not split over the tp dimension")
        kv = m.n_kv_heads or m.n_heads
        if m.n_heads % tp:
            raise ConfigError("backend.tp", f"{tp} does not divide model.n_heads={m.n_heads} (each tensor-parallel "
                                            "rank holds whole attention heads)")
        if kv % tp:
            raise ConfigError("backend.tp", f"{tp} does not divide model.n_kv_heads={kv} (each tensor-parallel "
                                            "rank holds whole key/value heads)")
        if world % tp:
            raise ConfigError("backend.tp", f"{tp} does not divide the world size {world}")
    replicate = 1
    if b.name == "fsdp" and b.hybrid_shard:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        if world % per_node:
            raise ConfigError("backend.hybrid_shard", f"world size {world} is not a multiple of the {per_node} "
                                                      "ranks per node")
        if per_node % tp:
            raise ConfigError("backend.tp", f"{tp} does not divide the {per_node} ranks per node (hybrid shard "
                                            "keeps a tensor-parallel group inside one node)")
        replicate = world // per_node
    return Layout(world=world, tp=tp, replicate=replicate, hybrid=bool(b.name == "fsdp" and b.hybrid_shard))


def build_mesh(device_type: str, lay: Layout) -> DeviceMesh:
    """The mesh of ``lay``: dims (replicate?, shard, tp?); without hybrid shard and tensor
    parallelism, the 1-D ``shard`` mesh of plain FSDP."""
    dims = [("replicate", lay.replicate)] if lay.hybrid else []
    dims.append(("shard", lay.shard))
    if lay.tp > 1:
        dims.append(("tp", lay.tp))
    names, shape = zip(*dims)
    mesh = init_device_mesh(device_type, tuple(shape), mesh_dim_names=tuple(names))
    if lay.tp > 1:
        # One flattened dimension over all ranks: a reduction over a parameter split on every
        # dimension (the gradient norm) is then one collective, not one per dimension.
        mesh[tuple(names)]._flatten("_".join(names))
    return mesh


def data_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel part of ``mesh``: what ``fully_shard`` shards (and replicates) over."""
    names = mesh.mesh_dim_names
    if "replicate" in names:
        return mesh["replicate", "shard"]
    return mesh["shard"]


def tp_mesh(mesh: DeviceMesh):
    """The tensor-parallel part of ``mesh``, or None without tensor parallelism."""
    return mesh["tp"] if "tp" in mesh.mesh_dim_names else None
