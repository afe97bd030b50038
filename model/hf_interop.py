"""Hugging Face interop: kiln's Transformer <-> transformers Llama names and configs.

kiln's ``Transformer`` is architecturally a ``LlamaForCausalLM`` (RMSNorm in fp32, rotary
embeddings in the rotate-half convention, SwiGLU, GQA, no biases), so conversion is a
renaming of tensors plus a config translation; no q/k permutation is needed.

Import (``load_hf_llama``) reads ``config.json`` and the weights with safetensors only
(no transformers needed) and refuses, naming the field, anything kiln cannot represent
exactly: other architectures, biases, rope scaling, sliding windows, non-SiLU MLPs.

This module imports nothing from ``train/``. Export (a kiln checkpoint to a transformers
directory that ``AutoModelForCausalLM`` / ``AutoTokenizer``, lm-evaluation-harness and
vLLM load) is ``train/hf_export.py``; the tokenizer conversion, which reproduces
SentencePiece's ids exactly, is ``data_pipeline/hf_tokenizer.py``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from model.llama import ModelConfig

CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPM_FILE = "tokenizer.model"
SAFE_INDEX = "model.safetensors.index.json"
END_OF_TURN = "<|end_of_turn|>"


class UnsupportedModelError(ValueError):
    """A Hugging Face checkpoint uses a feature kiln's Transformer cannot represent."""

    def __init__(self, field: str, value: Any, why: str):
        super().__init__(f"unsupported Hugging Face model: {field}={value!r}: {why}")
        self.field = field


# ---- tensor names ---------------------------------------------------------------------

_LAYER_MAP = {  # kiln suffix inside layers.{i}. -> HF suffix inside model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
_HF_TO_KILN_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_KILN_TOP = {v: k for k, v in _TOP_MAP.items()}
_LAYER_RE = re.compile(r"^(model\.)?layers\.(\d+)\.(.+)$")


def kiln_to_hf_name(name: str) -> str:
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for kiln parameter {name!r}")


def kiln_to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename kiln tensors to LlamaForCausalLM names. With tied embeddings ``lm_head`` is
    left out, as transformers does (it re-ties it to ``embed_tokens`` on load)."""
    out = {}
    for name, t in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        out[kiln_to_hf_name(name)] = t
    return out


def hf_to_kiln_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename LlamaForCausalLM tensors to kiln names; unknown tensors are an error (a
    bias or an extra module would otherwise be silently dropped and the model would be wrong)."""
    out = {}
    for name, t in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer older transformers saved; kiln derives it from rope_theta
        if name in _HF_TO_KILN_TOP:
            out[_HF_TO_KILN_TOP[name]] = t
            continue
        m = _LAYER_RE.match(name)
        if m and m.group(3) in _HF_TO_KILN_LAYER:
            out[f"layers.{m.group(2)}.{_HF_TO_KILN_LAYER[m.group(3)]}"] = t
            continue
        raise UnsupportedModelError(f"weights[{name}]", tuple(t.shape), "kiln's Llama has no such tensor "
                                    "(biases and extra modules are not supported)")
    if cfg.tie_embeddings:
        # transformers ties lm_head to embed_tokens even if a copy was saved.
        out["output.weight"] = out["tok_embeddings.weight"]
    elif "output.weight" not in out:
        raise UnsupportedModelError("tie_word_embeddings", False, "lm_head.weight is missing from the weights")
    return out


# ---- configs ---------------------------------------------------------------------------

def hf_config_dict(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int | None,
                   dtype: str = "float32") -> dict:
    """config.json of a LlamaForCausalLM equivalent to ``cfg``.

    ``rope_theta`` is written both at the top level (transformers 4.x reads it there) and in
    ``rope_parameters`` (transformers 5.x), so the directory loads with either.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "num_hidden_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
    }


_SUPPORTED_TYPES = ("llama", "mistral")


def model_config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A kiln ModelConfig from a config.json dict; raises UnsupportedModelError naming the
    first field kiln cannot honour exactly. ``overrides`` set kiln-only fields (dropout, ...)."""
    mt = hf.get("model_type")
    if mt not in _SUPPORTED_TYPES:
        raise UnsupportedModelError("model_type", mt, f"kiln imports {' / '.join(_SUPPORTED_TYPES)} models only")
    if mt == "mistral" and hf.get("sliding_window") is not None:
        raise UnsupportedModelError("sliding_window", hf["sliding_window"],
                                    "kiln's attention is full causal; no sliding-window attention")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise UnsupportedModelError(key, hf[key], "kiln's Linear layers have no bias")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError("hidden_act", act, "kiln's MLP is SwiGLU (silu)")
    if hf.get("pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModelError("pretraining_tp", hf["pretraining_tp"], "only pretraining_tp=1 is supported")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        rope.update(scaling)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        field = "rope_scaling" if scaling else "rope_parameters"
        raise UnsupportedModelError(f"{field}.rope_type", rope_type, "kiln implements plain rotary embeddings only "
                                    "(no linear/dynamic/yarn/llama3 scaling)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // h) or d % h:
        raise UnsupportedModelError("head_dim", hf.get("head_dim"),
                                    f"kiln needs head_dim = hidden_size / num_attention_heads = {d // h}")
    kv = hf.get("num_key_value_heads") or h
    cfg = ModelConfig(
        d_model=d, n_layers=hf["num_hidden_layers"], n_heads=h, n_kv_heads=kv,
        ffn_hidden=hf["intermediate_size"], vocab_size=hf["vocab_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a Hugging Face model directory (no config.json)")
    with open(path) as f:
        return json.load(f)


def _read_hf_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(directory, SAFE_INDEX)
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for name in files:
            state.update(load_file(os.path.join(directory, name)))
        return state
    if os.path.isfile(single):
        return load_file(single)
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory}: no model.safetensors, {SAFE_INDEX} or pytorch_model.bin")


def load_hf_llama(directory: str, **overrides) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, kiln state dict) of a local Llama-family Hugging Face directory.

    The config is checked before the weights are read, so an unsupported model fails fast.
    Tensors keep their stored dtype; ``Transformer.load_state_dict`` casts them.
    """
    cfg = model_config_from_hf(read_hf_config(directory), **overrides)
    return cfg, hf_to_kiln_state_dict(_read_hf_weights(directory), cfg)


def hf_sentencepiece_path(directory: str) -> str:
    """The SentencePiece model of an HF directory; kiln's Tokenizer cannot use anything else."""
    path = os.path.join(directory, SPM_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no {SPM_FILE}: kiln needs a SentencePiece tokenizer model (tokenizer.json-only "
            "tokenizers such as Llama 3's tiktoken-style BPE cannot be used); set tokenizer.path to a "
            "compatible .model file")
    return path


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))
