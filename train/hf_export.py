"""Export a kiln checkpoint as a transformers Llama directory.

The tensor names, the HF config and the tokenizer conversion are ``model/hf_interop.py``'s;
reading the checkpoint (any backend's format, verified) is ``train/checkpoint/full_state.py``'s. This
module puts them together and writes the directory: sharded safetensors with an index,
``config.json``, ``generation_config.json`` and the tokenizer files.
"""

from __future__ import annotations

import json
import os
import re

import torch

from data_pipeline.hf_tokenizer import save_hf_tokenizer
from model.hf_interop import (
    END_OF_TURN,
    SAFE_INDEX,
    SPM_FILE,
    hf_config_dict,
    kiln_to_hf_state_dict,
)
from train.checkpoint import CHAT_TEMPLATE
from train.checkpoint.full_state import load_model

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '500MiB' -> 500 * 2**20 (transformers' convention)."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(size)
    if not m:
        raise ValueError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base ** power)


def save_sharded_safetensors(state: dict[str, torch.Tensor], out_dir: str, max_shard_size: int | str) -> list[str]:
    """Write ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus the
    index transformers reads when the total exceeds ``max_shard_size``. A tensor larger
    than the limit gets a shard of its own. Returns the file names written."""
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata=meta)
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def export_hf(checkpoint: str, out_dir: str, max_shard_size: int | str = "5GB",
              dtype: str = "float32", chat_template: str | None = None) -> dict:
    """Write a transformers Llama directory for a kiln checkpoint; returns a summary.

    ``chat_template`` overrides the checkpoint's ``chat_template.jinja`` (if any).
    Weights are kept in fp32 by default, which is what kiln trains in, so HF logits match
    kiln's to float rounding; bf16 halves the size.
    """
    from data_pipeline.tokenizer import Tokenizer

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    dtype_name = str(torch_dtype).replace("torch.", "")
    model, step_dir = load_model(checkpoint)
    cfg = model.cfg
    spm = os.path.join(step_dir, SPM_FILE)
    tok = Tokenizer(spm)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but the model only {cfg.vocab_size} rows")
    if chat_template is None and os.path.isfile(os.path.join(step_dir, CHAT_TEMPLATE)):
        with open(os.path.join(step_dir, CHAT_TEMPLATE), encoding="utf-8") as f:
            chat_template = f.read()
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # shards of an earlier export would be picked up by the index-less loader
        if stale.endswith(".safetensors") or stale == SAFE_INDEX:
            os.remove(os.path.join(out_dir, stale))
    state = {k: v.detach().to(torch_dtype) for k, v in model.state_dict().items()}
    files = save_sharded_safetensors(kiln_to_hf_state_dict(state, cfg), out_dir, max_shard_size)
    pad = tok.pad_id if tok.pad_id >= 0 else None
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg, tok.bos_id, tok.eos_id, pad, dtype_name), f, indent=2)
    stop = [tok.eos_id] + ([tok.control[END_OF_TURN]] if END_OF_TURN in tok.control else [])
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": stop if len(stop) > 1 else stop[0], "pad_token_id": pad,
           "do_sample": True, "temperature": 0.8, "top_k": 40, "max_length": cfg.max_seq_len}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
    save_hf_tokenizer(spm, out_dir, cfg.max_seq_len, chat_template)
    return {"checkpoint": step_dir, "out_dir": os.path.abspath(out_dir), "weights": files, "dtype": dtype_name,
            "chat_template": chat_template is not None,
            "params": sum(t.numel() for t in model.parameters()), "shards": len(files)}
