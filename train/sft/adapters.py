"""LoRA adapter checkpoints after training: load several onto one base, switch, merge, export.

An adapter checkpoint (a step dir of a ``lora.enabled=true`` run) holds ``adapter.safetensors``
(adapter and, for classification, head tensors), ``adapter_config.json`` (rank, alpha,
targets, the base checkpoint) and the usual model_config.yaml / tokenizer.model. Merging
folds the adapter into the base weights and writes a plain kiln checkpoint directory that
``launch/generate.py`` and ``launch/export_hf.py`` read like any other.
"""

from __future__ import annotations

import json
import os

import torch

from model.llama import Transformer
from model.lora import load_adapter_tensors, merged_state_dict, set_active_adapter
from train import checkpoint as ckpt
from train.checkpoint import ADAPTER_CONFIG
from train.full_state import FullState, load_init_weights, read_adapter_state


def adapter_config(step_dir: str) -> dict:
    path = os.path.join(step_dir, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{step_dir} has no {ADAPTER_CONFIG}: not a LoRA checkpoint")
    with open(path) as f:
        return json.load(f)


def load_base(step_dir: str) -> Transformer:
    """The base model an adapter checkpoint was trained on (any backend's checkpoint format)."""
    cfg = adapter_config(step_dir)
    model = Transformer(ckpt.read_model_config(step_dir))
    load_init_weights(model, cfg["base"])
    return model.eval()


def add_adapter_from(model: torch.nn.Module, step_dir: str, name: str | None = None) -> str:
    """Put the adapter of ``step_dir`` on ``model`` under ``name`` (default: its own name) and
    make it active. Several adapters can be added to one base and switched with
    ``model.lora.set_active_adapter``."""
    cfg = adapter_config(step_dir)
    name = name or cfg["name"]
    tensors = read_adapter_state(step_dir).model
    load_adapter_tensors(model, tensors, cfg["name"], name, cfg["rank"], cfg["alpha"], cfg["targets"])
    set_active_adapter(model, name)
    return name


def merge_checkpoint(step_dir: str, out_dir: str) -> str:
    """Write base + adapter, merged, as a consolidated kiln checkpoint directory."""
    step_dir = ckpt.resolve(step_dir)
    if adapter_config(step_dir).get("task") == "classification":
        raise ValueError(f"{step_dir}: a classification adapter has a head, not a language model to export")
    model = load_base(step_dir)
    add_adapter_from(model, step_dir)
    state = merged_state_dict(model)
    plain = Transformer(model.cfg)
    plain.load_state_dict(state, strict=True)  # proves the merged weights form a plain model
    os.makedirs(out_dir, exist_ok=True)
    FullState(model=plain.state_dict()).save(out_dir)
    ckpt.copy_carried(step_dir, out_dir, (ckpt.MODEL_CONFIG, ckpt.TOKENIZER, ckpt.CHAT_TEMPLATE, ckpt.CONFIG))
    return out_dir
