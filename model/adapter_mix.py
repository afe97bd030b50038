"""Adapter mixing and switching: one base model, several LoRA adapters, blended or picked per request.

A blend ``{"python": 0.7, "sql": 0.3}`` is the linear combination of the adapters' weight
deltas: every LoRA layer computes ``x W^T + sum_i w_i * scale_i * x A_i^T B_i^T``, which is
``x (W + sum_i w_i * delta_i)^T``. Weights are any real numbers (they need not sum to 1;
a negative weight subtracts an adapter). An adapter a layer does not hold contributes
nothing there. Three ways to use a blend:

- at run time, without copying anything (``set_blend``, ``using``): the base and every
  adapter stay as loaded, so switching between adapters or blends per request costs no
  reload (``using`` restores the previous routing afterwards);
- as one new adapter (``add_blended_adapter``) by **rank concatenation**: ``A = [A_1; A_2]``
  (rank r_1 + r_2) and ``B = [w_1 s_1 B_1, w_2 s_2 B_2]`` with scale 1 give exactly
  ``B A = sum_i w_i * delta_i``. This is the only combination of factors offered: summing the
  A's and the B's separately (what PEFT calls ``linear``) is not the sum of the deltas;
- merged into plain weights (``model.lora.merged_state_dict(model, blend)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn as nn

from model.lora import LoRALinear, adapter_names, lora_modules, set_active_adapter

Spec = str | Mapping[str, float] | None  # an adapter name, a blend, or None (the bare base)


def _check_names(model: nn.Module, names) -> None:
    have = adapter_names(model)
    missing = [n for n in names if n not in have]
    if missing:
        raise KeyError(f"no adapter named {missing} (have {have})")


def set_blend(model: nn.Module, weights: Mapping[str, float]) -> None:
    """Route every LoRA layer through the weighted sum of the named adapters."""
    if not weights:
        raise ValueError("an adapter blend needs at least one adapter")
    _check_names(model, weights)
    pairs = tuple((str(n), float(w)) for n, w in weights.items())
    for m in lora_modules(model):
        m.active = None
        m.mix = tuple((n, w) for n, w in pairs if n in m.scale)


def current(model: nn.Module) -> Spec:
    """What the model runs now: an adapter name, a blend {name: weight}, or None."""
    for m in lora_modules(model):
        if m.active is not None:
            return m.active
    blend: dict[str, float] = {}
    for m in lora_modules(model):
        blend.update(dict(m.mix))
    return blend or None


def apply(model: nn.Module, spec: Spec) -> None:
    """Route the model through ``spec``: an adapter name, a blend, or None (the base)."""
    if spec is None or isinstance(spec, str):
        set_active_adapter(model, spec)
    else:
        set_blend(model, spec)


@contextlib.contextmanager
def using(model: nn.Module, spec: Spec) -> Iterator[nn.Module]:
    """Run the block with adapter (or blend) ``spec``, then restore what was active: for
    serving several adapters from one loaded base, switching per request."""
    before = current(model)
    apply(model, spec)
    try:
        yield model
    finally:
        apply(model, before)


def blend_delta(mod: LoRALinear, weights: Mapping[str, float]) -> torch.Tensor:
    """The blend's update to ``mod``'s weight (out, in): sum_i w_i * delta_i."""
    out = torch.zeros(mod.out_features, mod.in_features, dtype=torch.float32, device=mod.A(next(iter(mod.scale))).device)
    for n, w in weights.items():
        if n in mod.scale:
            out = out + float(w) * mod.delta(n).float()
    return out


def add_blended_adapter(model: nn.Module, name: str, weights: Mapping[str, float]) -> list[str]:
    """Add adapter ``name`` equal to the blend, by rank concatenation (exact; its rank on a
    layer is the sum of the blended adapters' ranks there; scale 1). Returns its parameter names."""
    if not weights:
        raise ValueError("an adapter blend needs at least one adapter")
    _check_names(model, weights)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} already exists")
    names = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        parts = [(n, float(w)) for n, w in weights.items() if n in mod.scale]
        if not parts:
            continue
        a = torch.cat([mod.A(n).detach() for n, _ in parts], dim=0)
        b = torch.cat([mod.B(n).detach() * (w * mod.scale[n]) for n, w in parts], dim=1)
        active = mod.active
        mod.add_adapter(name, a.shape[0], float(a.shape[0]), 0.0)  # alpha = rank: scale 1
        mod.active = active  # add_adapter activates it; the routing stays the caller's choice
        with torch.no_grad():
            mod.A(name).copy_(a)
            mod.B(name).copy_(b)
        names += [f"{mod_name}.lora_A_{name}", f"{mod_name}.lora_B_{name}"]
    return names
