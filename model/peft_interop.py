"""PEFT interop: kiln LoRA adapters <-> Hugging Face PEFT adapter directories.

A PEFT LoRA adapter directory is ``adapter_config.json`` (``peft_type: LORA``, ``r``,
``lora_alpha``, ``target_modules``, optional per-module ``rank_pattern`` / ``alpha_pattern``)
and ``adapter_model.safetensors`` with ``base_model.model.<HF module>.lora_A.weight`` (r, in)
and ``...lora_B.weight`` (out, r). PEFT computes ``W x + (lora_alpha / r) B A x``, which is
kiln's ``LoRALinear`` term for term, so conversion is renaming: the module names come from
``model.hf_interop.kiln_to_hf_name`` (the one owner of kiln <-> HF names) and the factors are
copied unchanged. ``peft.PeftModel.from_pretrained(<kiln HF export>, <exported dir>)`` then
computes kiln's logits, and a PEFT adapter imported here computes PEFT's.

The config is checked against an allowlist of peft's ``LoraConfig`` fields (``check_peft_config``):
each is honoured (``r``, ``lora_alpha``, ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT
resolves them, ``use_rslora``: scale ``alpha / sqrt(r)``, ``lora_dropout``), neutral (metadata,
which modules carry factors: the weights say), or refused when set (UnsupportedAdapterError naming
the field), because kiln's LoRA does not compute it: DoRA, LoRA biases, ``fan_in_fan_out``,
``modules_to_save``, layer replication, activated LoRA, an initialisation that rewrites the base
weights (PiSSA, LoftQ, ...), the other LoRA variants. A field kiln does not know is refused unless
it is null, false or empty, so a newer PEFT's option is never imported as plain LoRA. Target
modules kiln's Llama does not have and a pickled ``adapter_model.bin`` are refused too.

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
import re
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


# What kiln does with each field of peft's LoraConfig (0.21; a test checks the installed peft has no
# other). Honoured: read by add_peft_adapter, or checked below.
HONOURED = ("peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout",
            "init_lora_weights")
# Neutral at any value: metadata, which modules carry factors (the weights say), runtime settings,
# and options read only together with a refused field (megatron_core with megatron_config,
# qalora_group_size with use_qalora, the init configs with their init_lora_weights).
NEUTRAL = ("task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
           "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "runtime_config",
           "ensure_weight_tying", "megatron_core", "qalora_group_size", "eva_config", "loftq_config",
           "corda_config", "lora_ga_config")
# Refused when not at their default (or null / false / empty): each changes what the adapter computes or trains.
REFUSED = {
    "use_dora": (False, "DoRA's magnitude vector is not kiln's LoRA"),
    "bias": ("none", "kiln's projections have no biases"),
    "lora_bias": (False, "kiln's LoRA has no bias"),
    "fan_in_fan_out": (False, "Llama's Linear layers are not Conv1D"),
    "modules_to_save": (None, "fully trained extra modules are not an adapter"),
    "trainable_token_indices": (None, "trained embedding rows are not an adapter"),
    "layer_replication": (None, "kiln does not replicate layers"),
    "target_parameters": (None, "kiln's LoRA wraps Linear layers, not parameters"),
    "megatron_config": (None, "Megatron's parallel layers are not kiln's"),
    "alora_invocation_tokens": (None, "activated LoRA applies only after its invocation tokens"),
    "use_qalora": (False, "QALoRA pools the input before A"),
    "velora_config": (None, "a LoRA variant kiln does not compute"),
    "monteclora_config": (None, "a LoRA variant kiln does not compute"),
    "use_bdlora": (None, "a LoRA variant kiln does not compute"),
    "arrow_config": (None, "a LoRA variant kiln does not compute"),
    "kasa_config": (None, "a LoRA variant kiln does not compute"),
}
# Initialisations of the factors alone; the others rewrite the base weights the adapter is added to
# (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or freeze B (MiCA).
PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # and true / false


def _unset(value, default=None) -> bool:
    return value is None or value is False or value == [] or value == {} or value == default


def _check_patterns(cfg: dict) -> None:
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = cfg.get(field) or {}
        if not isinstance(patterns, dict):
            raise UnsupportedAdapterError(field, patterns, "must be an object of pattern -> value")
        for key, value in patterns.items():
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value <= 0:
                raise UnsupportedAdapterError(f"{field}[{key}]", value, f"must be a positive {'integer' if integer else 'number'}")
            try:
                re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                raise UnsupportedAdapterError(f"{field}[{key}]", key, f"not a regular expression: {e}") from None


def check_peft_config(cfg, source: str = PEFT_CONFIG) -> dict:
    """``cfg`` (the parsed ``adapter_config.json`` of ``source``) if kiln's LoRA computes it;
    UnsupportedAdapterError naming the field otherwise. An allowlist, so that an option of a newer
    PEFT is refused rather than imported as plain LoRA. Reading the file is the caller's
    (``train.sft.adapters.load_peft_adapter`` reads it as untrusted checkpoint input)."""
    if not isinstance(cfg, dict):
        raise UnsupportedAdapterError(source, type(cfg).__name__, "holds no JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError("peft_type", cfg["peft_type"], "only LoRA adapters are supported")
    for field, value in cfg.items():
        if field in REFUSED and not _unset(value, REFUSED[field][0]):
            raise UnsupportedAdapterError(field, value, REFUSED[field][1])
        if field not in HONOURED + NEUTRAL and field not in REFUSED and not _unset(value):
            raise UnsupportedAdapterError(field, value, "not a LoRA option kiln knows; it may change what the adapter computes")
    for field in ("r", "lora_alpha"):
        if isinstance(cfg.get(field), bool) or not isinstance(cfg.get(field), (int, float)) or cfg[field] <= 0:
            raise UnsupportedAdapterError(field, cfg.get(field), "must be a positive number")
    dropout = cfg.get("lora_dropout") or 0.0
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UnsupportedAdapterError("lora_dropout", dropout, "must be a number in [0, 1)")
    init = cfg.get("init_lora_weights")
    if not (init is None or isinstance(init, bool) or init in PLAIN_INITS):
        raise UnsupportedAdapterError("init_lora_weights", init,
                                      "rewrites the base weights or freezes B; save it converted to plain LoRA "
                                      "(save_pretrained(path_initial_model_for_weight_conversion=...))")
    _check_patterns(cfg)
    return cfg


def _pattern_value(patterns: dict, hf_module: str, default):
    """PEFT's rule (``peft.utils.other.get_pattern_key``, then ``.get``): each key is a regular
    expression that must match the whole module name or a part of it after a dot; the first
    matching key in the file's order wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf_module):
            return value
    return patterns.get(hf_module, default)


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
        owner = model.get_submodule(parent)
        mod = lora_layer(owner, attr)
        mod.add_adapter(name, r, scale * r, float(cfg.get("lora_dropout") or 0.0))
        mod.train(owner.training)  # a new Dropout is in training mode, even on a model in eval mode
        with torch.no_grad():
            mod.A(name).copy_(a)
            mod.B(name).copy_(b)
        names += [f"{parent}.{attr}.lora_A_{name}", f"{parent}.{attr}.lora_B_{name}"]
    set_active_adapter(model, name)
    return names
