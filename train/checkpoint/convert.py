"""Writers for the formats a checkpoint converts to (``launch/convert_checkpoint.py``): a
portable checkpoint, FSDP's DCP layout and native DeepSpeed ZeRO shards, each sealed with
a manifest and moved into place as a complete kiln checkpoint."""

from __future__ import annotations

import os
import socket

import torch
from omegaconf import OmegaConf

from model.llama import Transformer
from train import checkpoint as ckpt
from train.checkpoint.full_state import MOMENTS, FullState, read_full_state
from train.checkpoint.layout import DCP_DIR


def load_full(src: str, with_optimizer: bool) -> tuple[FullState, Transformer]:
    with torch.device("meta"):
        model = Transformer(ckpt.read_model_config(src))
    return read_full_state(src, model, with_optimizer=with_optimizer), model


def write_dcp(st: FullState, directory: str) -> None:
    """The layout the FSDP backend saves: {"model": ..., "optim": {"state": ...}} by parameter name."""
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: v.contiguous() for k, v in st.model.items()}, "optim": {"state": {}}}
    for name, m in st.moments.items():
        state["optim"]["state"][name] = {"step": torch.tensor(float(st.step)),
                                         **{k: m[k].float().contiguous() for k in MOMENTS}}
    dcp.save(state, checkpoint_id=os.path.join(directory, DCP_DIR), no_dist=True)


def finish(src: str, tmp: str, out: str, meta_updates: dict) -> str:
    """Carry the trainer state, config and tokenizer over, seal with a manifest, move into place."""
    ckpt.copy_carried(src, tmp)
    meta = {k: v for k, v in ckpt.read_meta(src).items() if k not in ("files", "complete", "time")}
    ckpt.seal(tmp, dict(meta, **meta_updates, converted_from=os.path.abspath(src)))
    if os.path.exists(out):
        raise FileExistsError(f"{out} exists; refusing to overwrite")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    os.replace(tmp, out)
    return out


def convert_to_deepspeed(src: str, tmp: str, zero_stage: int, world_size: int) -> None:
    """Start ``world_size`` local DeepSpeed ranks (gloo on CPU, nccl on GPUs), load the full
    state through DeepSpeed's public setters and let DeepSpeed write its own shards."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_deepspeed_worker, args=(world_size, port, src, tmp, zero_stage), nprocs=world_size, join=True)


def _deepspeed_worker(rank: int, world_size: int, port: int, src: str, tmp: str, zero_stage: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from train.backends.deepspeed import DeepSpeedBackend
    from train.config import register_configs

    register_configs()
    cfg = OmegaConf.create(ckpt.read_yaml(os.path.join(src, ckpt.CONFIG)))
    cfg.backend.ds_config = None  # the checkpoint's own choice of a JSON file elsewhere is not followed
    cfg.backend.name, cfg.backend.zero_stage = "deepspeed", zero_stage
    cfg.backend.offload_optimizer = cfg.backend.offload_params = False
    backend = DeepSpeedBackend(cfg)
    torch.manual_seed(0)
    backend.setup(Transformer(ckpt.read_model_config(src)))
    backend.load(src, {"world_size": -1})  # never native: go through the portable full state
    backend.save(tmp)
    backend.shutdown()
