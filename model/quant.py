"""4-bit NF4 base weights for QLoRA (Dettmers et al. 2023), on CPUs and GPUs alike.

QLoRA keeps the frozen base weights of the LoRA-targeted projections in 4-bit NormalFloat
(NF4) with double quantization (the per-block absmax scales are themselves quantized to
8 bits), dequantizes them on the fly in the forward, and trains the fp32 adapters on top.
bitsandbytes (>= 0.46) does this through a device-agnostic API: ``Params4bit`` quantizes when
moved to a device, ``matmul_4bit`` and ``functional.dequantize_4bit`` run on the CPU as on
CUDA, so QLoRA runs (and is tested) on a CPU-only machine.

This module is the one owner of the format: ``model.lora`` asks it whether a weight is
quantized, how to multiply by it and how to dequantize it (merging, exporting); nothing
else touches bitsandbytes. A quantized weight keeps its parameter name
(``layers.0.attn.wq.weight``) but is a packed uint8 tensor plus a ``quant_state``: it is
never written to a checkpoint (QLoRA runs save adapters only) and is recomputed from the
full-precision base (quantization is deterministic) wherever an adapter is loaded.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

QUANT_TYPE = "nf4"  # the QLoRA paper's data type: optimal for normally distributed weights
BLOCKSIZE = 64  # values per absmax scale (QLoRA's choice)


def unavailable_reason() -> str | None:
    """None when 4-bit weights can be used in this environment, else why not."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "bitsandbytes is not installed (pip install 'bitsandbytes>=0.46')"
    if not hasattr(bnb, "matmul_4bit") or not hasattr(bnb.functional, "dequantize_4bit"):
        return f"bitsandbytes {getattr(bnb, '__version__', '?')} has no 4-bit API (need >= 0.46)"
    return None


def is_quantized(w: torch.Tensor) -> bool:
    """True for a bitsandbytes 4-bit parameter (packed data plus its quant_state)."""
    return getattr(w, "quant_state", None) is not None


def quantize(w: torch.Tensor, double_quant: bool = True) -> nn.Parameter:
    """``w`` (out, in) as a frozen NF4 ``Params4bit`` on ``w``'s device; its quant_state
    remembers the shape and dtype it dequantizes back to."""
    import bitsandbytes as bnb

    device = w.device
    p = bnb.nn.Params4bit(w.detach().to("cpu", copy=True), requires_grad=False, blocksize=BLOCKSIZE,
                          compress_statistics=double_quant, quant_type=QUANT_TYPE)
    return p.to(device)  # quantization happens on the move to a device


def dequantize(w: torch.Tensor) -> torch.Tensor:
    """The dense weight a quantized parameter stands for (its original shape and dtype);
    a dense tensor is returned as is."""
    if not is_quantized(w):
        return w
    import bitsandbytes.functional as bf

    return bf.dequantize_4bit(w.data, w.quant_state)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ W^T`` for a quantized ``w``: bitsandbytes dequantizes ``w`` in the input's dtype
    and backpropagates into ``x`` only (the base is frozen)."""
    import bitsandbytes as bnb

    return bnb.matmul_4bit(x, w.t(), quant_state=w.quant_state)


def tensor_bytes(w: torch.Tensor) -> int:
    """Bytes a parameter holds, a quantized one's statistics (absmax, nested absmax, code
    books) included."""
    n = w.numel() * w.element_size()
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None), getattr(qs.state2, "code", None)):
            if t is not None:
                n += t.numel() * t.element_size()
    return n


def logical_numel(w: torch.Tensor) -> int:
    """The element count of the weight a parameter stands for (not its packed bytes)."""
    qs = getattr(w, "quant_state", None)
    return int(qs.shape.numel()) if qs is not None else w.numel()


def weight_memory(model: nn.Module) -> dict[str, int]:
    """The model's parameter bytes as held (``held``: 4-bit where quantized, each other
    parameter in its dtype) and as they would be held dense in fp32 and in bf16."""
    held = dense = 0
    for p in model.parameters():
        held += tensor_bytes(p)
        dense += logical_numel(p)
    return {"held": held, "fp32": dense * 4, "bf16": dense * 2}
