"""PEFT interop: kiln LoRA adapters <-> Hugging Face PEFT adapter directories.

A PEFT LoRA adapter directory is ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``target_modules``, optional per-module ``rank_pattern`` / ``alpha_pattern``)
and ``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). PEFT computes ``W x + (lora_alpha / r) B A x``, which is
kiln's ``LoRALinear`` term for term, so conversion is renaming: the module names come from
``model.hf_interop.kiln_to_hf_name`` (the one owner of kiln <-> HF names) and the factors are
copied unchanged. ``peft.PeftModel.from_pretrained(<kiln HF export>, <exported dir>)`` then
computes kiln's logits, and a PEFT adapter imported here computes PEFT's.

What is refused on import (UnsupportedAdapterError naming the field), because kiln's LoRA
does not compute it: DoRA, LoRA biases, ``fan_in_fan_out``, ``modules_to_save``, layer
replication, target modules kiln's Llama does not have, pickled ``adapter_model.bin``.
rsLoRA (``use_rslora``: scale ``alpha / sqrt(r)``) is accepted: kiln stores the scale.

This module imports nothing from ``train/`` and reads no files: exporting an adapter
checkpoint goes through ``launch/export_hf.py --peft`` (which loads the base and the adapter
first), and importing a directory through ``train.sft.adapters.load_peft_adapter``, which reads
its two files as untrusted checkpoint input (regular files only, malformed JSON an error naming
the file) and hands the config and tensors to ``add_peft_adapter`` here, which checks every
factor's shape against the projection it lands on.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import torch
import torch.nn as nn

from model.hf_interop import kiln_to_hf_name
from model.lora import ATTN, MLP, LoRALinear, lora_layer, set_active_adapter, target_modules

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # what PeftModel puts before the transformers module names


class UnsupportedAdapterError(ValueError):
    """A PEFT adapter uses a feature kiln's LoRA cannot represent."""

    def __init__(self, field: str, value, why: str):
        super().__init__(f"unsupported PEFT adapter: {field}={value!r}: {why}")
        self.field = field


def _hf_module(kiln_module: str) -> str:
    """``layers.0.attn.wq`` -> ``model.layers.0.self_attn.q_proj``."""
    return kiln_to_hf_name(f"{kiln_module}.weight").removesuffix(".weight")


def _short(hf_module: str) -> str:
    return hf_module.rsplit(".", 1)[-1]


def save_peft_adapter(model: nn.Module, adapter: str, out_dir: str, base_model_name_or_path: str | None = None,
                      dropout: float = 0.0) -> dict:
    """Write adapter ``adapter`` of ``model`` as a PEFT LoRA adapter directory. Layers whose
    rank or scale differs from the most common one (a rank-concatenated blend) go to
    ``rank_pattern`` / ``alpha_pattern`` under their full module name. Returns the config."""
    from safetensors.torch import save_file

    tensors, shapes = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear) and adapter in mod.scale:
            hf = _hf_module(name)
            a, b = mod.A(adapter).detach(), mod.B(adapter).detach()
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = a.float().contiguous().cpu()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = b.float().contiguous().cpu()
            r = a.shape[0]
            shapes[hf] = (r, mod.scale[adapter] * r)  # (rank, alpha): scale = alpha / r
    if not shapes:
        raise KeyError(f"no adapter named {adapter!r} on the model")
    (r, alpha), _ = Counter(shapes.values()).most_common(1)[0]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "target_modules": sorted({_short(m) for m in shapes}),
        "rank_pattern": {m: s[0] for m, s in shapes.items() if s[0] != r},
        "alpha_pattern": {m: s[1] for m, s in shapes.items() if s[1] != alpha},
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, PEFT_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out_dir, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=1)
    return config


def check_peft_config(cfg, source: str = PEFT_CONFIG) -> dict:
    """``cfg`` (the parsed ``adapter_config.json`` of ``source``) if kiln's LoRA computes it;
    UnsupportedAdapterError naming the field otherwise. Reading the file is the caller's
    (``train.sft.adapters.load_peft_adapter`` reads it as untrusted checkpoint input)."""
    if not isinstance(cfg, dict):
        raise UnsupportedAdapterError(source, type(cfg).__name__, "holds no JSON object")
    refuse = [("peft_type", cfg.get("peft_type", "LORA") != "LORA", "only LoRA adapters are supported"),
              ("use_dora", bool(cfg.get("use_dora")), "DoRA's magnitude vector is not kiln's LoRA"),
              ("bias", cfg.get("bias", "none") != "none", "kiln's projections have no biases"),
              ("lora_bias", bool(cfg.get("lora_bias")), "kiln's LoRA has no bias"),
              ("fan_in_fan_out", bool(cfg.get("fan_in_fan_out")), "Llama's Linear layers are not Conv1D"),
              ("modules_to_save", bool(cfg.get("modules_to_save")), "fully trained extra modules are not an adapter"),
              ("layer_replication", bool(cfg.get("layer_replication")), "kiln does not replicate layers")]
    for field, bad, why in refuse:
        if bad:
            raise UnsupportedAdapterError(field, cfg.get(field), why)
    for field in ("r", "lora_alpha"):
        if isinstance(cfg.get(field), bool) or not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise UnsupportedAdapterError(field, cfg.get(field), "must be a positive number")
    return cfg


def _pattern_value(patterns: dict, hf_module: str, default):
    """PEFT's rule: a pattern key applies to a module whose name ends with ``.<key>`` or is it."""
    for key, value in patterns.items():
        if hf_module == key or hf_module.endswith(f".{key}"):
            return value
    return default


def add_peft_adapter(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor],
                     name: str = "default") -> list[str]:
    """Add a PEFT LoRA adapter (its checked config and its ``adapter_model.safetensors``
    tensors) to a kiln ``Transformer`` as adapter ``name`` (active). Every tensor must find
    its place and every module its two factors, of shapes (r, in) and (out, r) exactly
    (UnsupportedAdapterError naming the tensor otherwise, before anything is added).
    Returns the new parameter names. Reading the directory is
    ``train.sft.adapters.load_peft_adapter``'s."""
    cfg = check_peft_config(cfg)
    by_hf = {_hf_module(f"{parent}.{attr}"): (parent, attr) for parent, _, attr in target_modules(model, ATTN + MLP)}
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        stem = key.removeprefix(PREFIX)
        for part in ("lora_A", "lora_B"):
            for suffix in (f".{part}.weight", f".{part}.default.weight"):
                if stem.endswith(suffix):
                    factors.setdefault(stem.removesuffix(suffix), {})[part] = (key, t)
                    break
            else:
                continue
            break
        else:
            raise UnsupportedAdapterError(f"weights[{key}]", tuple(t.shape), "not a LoRA factor")
    r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    planned = []
    for hf, ab in sorted(factors.items()):
        if hf not in by_hf:
            raise UnsupportedAdapterError(f"weights[{hf}]", None, "kiln's Llama has no such projection")
        if set(ab) != {"lora_A", "lora_B"}:
            raise UnsupportedAdapterError(f"weights[{hf}]", sorted(ab), "needs both lora_A and lora_B")
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, hf, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, hf, alpha0))
        parent, attr = by_hf[hf]
        linear = getattr(model.get_submodule(parent), attr)
        for part, want in (("lora_A", (r, linear.in_features)), ("lora_B", (linear.out_features, r))):
            key, t = ab[part]
            if tuple(t.shape) != want:  # copy_ would broadcast a size-1 dimension silently
                raise UnsupportedAdapterError(f"weights[{key}]", tuple(t.shape),
                                              f"must have shape {want} (rank r={r}, {parent}.{attr} is "
                                              f"{linear.in_features} -> {linear.out_features})")
        lora = getattr(linear, "scale", None)
        if lora is not None and name in lora:
            raise ValueError(f"adapter {name!r} already exists on {parent}.{attr}")
        planned.append((parent, attr, r, alpha, ab["lora_A"][1], ab["lora_B"][1]))
    if not planned:
        raise UnsupportedAdapterError("weights", [], "no LoRA factor found")
    names = []
    for parent, attr, r, alpha, a, b in planned:
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        mod = lora_layer(model.get_submodule(parent), attr)
        mod.add_adapter(name, r, scale * r, 0.0)
        with torch.no_grad():
            mod.A(name).copy_(a)
            mod.B(name).copy_(b)
        names += [f"{parent}.{attr}.lora_A_{name}", f"{parent}.{attr}.lora_B_{name}"]
    set_active_adapter(model, name)
    return names
