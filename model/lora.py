"""LoRA (Hu et al. 2021): frozen base weights plus a trained low-rank update B @ A.

kiln's own small module instead of peft, for three reasons: parameter names stay stable
(``layers.0.attn.wq.weight`` is still the base weight, adapters add
``layers.0.attn.wq.lora_A_<name>`` / ``lora_B_<name>``), so base checkpoints of any backend
load unchanged; the model stays a plain ``Transformer`` that FSDP's per-block sharding and
DeepSpeed ZeRO handle like any other (frozen parameters are simply not in the optimizer);
and several named adapters can sit on one base and be switched without copying it.

``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` with A ~ Kaiming-uniform and B = 0, so a
fresh adapter leaves the model exactly equal to its base. ``merged_state_dict`` folds an
adapter into base-named weights for export.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import quant

ATTN = ("wq", "wk", "wv", "wo")
MLP = ("w1", "w2", "w3")


class LoRALinear(nn.Linear):
    """A bias-free Linear with named adapters; ``active`` (None = base only) picks one, or
    ``mix`` (``model.adapter_mix``) weights several. ``weight`` may be 4-bit (QLoRA,
    ``model.quant``): the forward and ``dense_weight`` handle both."""

    def __init__(self, base: nn.Linear):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight  # the same Parameter: no copy, and its name is unchanged
        # Adapters are direct parameters (lora_A_<name>), not a ParameterDict: ZeRO-3 gathers a
        # module's own parameters before its forward, not those of a container it never calls.
        self.lora_dropout = nn.ModuleDict()
        self.scale: dict[str, float] = {}
        self.active: str | None = None
        self.mix: tuple[tuple[str, float], ...] = ()  # (adapter, weight) pairs, used when active is None

    @property
    def adapters(self) -> list[str]:
        return list(self.scale)

    def A(self, name: str) -> nn.Parameter:
        return getattr(self, f"lora_A_{name}")

    def B(self, name: str) -> nn.Parameter:
        return getattr(self, f"lora_B_{name}")

    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float) -> None:
        dev = self.weight.device if self.weight.device.type != "meta" else None
        a = torch.empty(rank, self.in_features, device=dev, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # peft's and the paper's choice; B = 0 keeps f(x) unchanged
        self.register_parameter(f"lora_A_{name}", nn.Parameter(a))
        self.register_parameter(f"lora_B_{name}", nn.Parameter(
            torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32)))
        # a new module starts in training mode: follow the layer's, so an adapter added to a
        # model in eval mode applies no dropout at inference
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.scale[name] = alpha / rank
        self.active = name

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's update to ``weight`` (out, in)."""
        return (self.B(name) @ self.A(name)) * self.scale[name]

    def dense_weight(self) -> torch.Tensor:
        """The base weight (out, in) in its original dtype, dequantized if it is 4-bit."""
        return quant.dequantize(self.weight)

    def terms(self) -> list[tuple[str, float]]:
        """The (adapter, weight) pairs this forward adds: the active adapter alone, else the mix."""
        if self.active is not None:
            return [(self.active, 1.0)]
        return [(n, w) for n, w in self.mix if n in self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        y = quant.linear(x, w) if quant.is_quantized(w) else F.linear(x, w)
        for name, weight in self.terms():
            a, b = self.A(name), self.B(name)
            h = self.lora_dropout[name](x).to(a.dtype)
            y = y + (F.linear(F.linear(h, a), b) * (self.scale[name] * weight)).to(y.dtype)
        return y


def target_modules(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module, str]]:
    """(parent name, parent module, attribute) of every projection named in ``targets``."""
    targets = set(targets)
    out = []
    for i, block in enumerate(model.layers):
        for parent_name, parent, names in ((f"layers.{i}.attn", block.attn, ATTN), (f"layers.{i}.mlp", block.mlp, MLP)):
            out += [(parent_name, parent, n) for n in names if n in targets]
    return out


def lora_layer(parent: nn.Module, attr: str) -> LoRALinear:
    """``parent.<attr>`` as a LoRALinear (wrapping the plain Linear there, once)."""
    mod = getattr(parent, attr)
    if not isinstance(mod, LoRALinear):
        mod = LoRALinear(mod).train(mod.training)  # in the mode of the layer it wraps
        setattr(parent, attr, mod)
    return mod


def add_lora(model: nn.Module, name: str, rank: int, alpha: float, dropout: float = 0.0,
             targets: Iterable[str] = ATTN + MLP) -> list[str]:
    """Add adapter ``name`` on the target projections (making them LoRALinear) and activate it.
    Returns the new parameter names."""
    names = []
    for parent_name, parent, attr in target_modules(model, targets):
        mod = lora_layer(parent, attr)
        if name in mod.scale:
            raise ValueError(f"adapter {name!r} already exists on {parent_name}.{attr}")
        mod.add_adapter(name, rank, alpha, dropout)
        names += [f"{parent_name}.{attr}.lora_A_{name}", f"{parent_name}.{attr}.lora_B_{name}"]
    if not names:
        raise ValueError(f"lora.targets: no projection of the model matches {sorted(targets)}")
    return names


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def adapter_names(model: nn.Module) -> list[str]:
    return sorted({a for m in lora_modules(model) for a in m.adapters})


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Route every LoRA layer through adapter ``name`` (None: the bare base model). Layers the
    adapter does not target (adapters may target different projections) run their base weight."""
    mods = lora_modules(model)
    if name is not None and not any(name in m.scale for m in mods):
        raise KeyError(f"no adapter named {name!r} (have {sorted({a for m in mods for a in m.adapters})})")
    for m in mods:
        m.active = name if name in m.scale else None
        m.mix = ()


def train_only(model: nn.Module, adapter: str, extra_prefixes: Iterable[str] = ()) -> list[str]:
    """Freeze everything except adapter ``adapter`` (and parameters under ``extra_prefixes``,
    e.g. a classification head). Returns the trainable names."""
    extra = tuple(extra_prefixes)
    suffix_a, suffix_b = f".lora_A_{adapter}", f".lora_B_{adapter}"
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad = n.endswith((suffix_a, suffix_b)) or (bool(extra) and n.startswith(extra))
        if p.requires_grad:
            trainable.append(n)
    return trainable


def lora_param_count(cfg, rank: int, targets: Iterable[str]) -> int:
    """Closed form: r * (in + out) for every targeted projection of every layer."""
    d, hd, kv, hid = cfg.d_model, cfg.head_dim, cfg.kv_heads, cfg.hidden_dim
    shapes = {"wq": (d, cfg.n_heads * hd), "wk": (d, kv * hd), "wv": (d, kv * hd), "wo": (cfg.n_heads * hd, d),
              "w1": (d, hid), "w3": (d, hid), "w2": (hid, d)}
    return cfg.n_layers * sum(rank * sum(shapes[t]) for t in set(targets))


def merged_state_dict(model: nn.Module, adapter: str | dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Base-named weights with adapter ``adapter`` folded in: loads into a plain ``Transformer``
    of the same config, with or without tied embeddings. ``adapter`` may be a blend
    {name: weight} (``model.adapter_mix``): its deltas are added with those weights. The
    default is what each layer computes now (``LoRALinear.terms``: the active adapter, or the
    blend ``set_blend`` routed it through), so the merged model is the one that runs; taking
    only an active adapter would merge a blended model into its bare base. 4-bit base weights
    (QLoRA) are dequantized first, so the merged model is the one the adapter was trained
    with: the NF4-rounded base plus the delta."""
    blend = adapter if isinstance(adapter, dict) else ({adapter: 1.0} if adapter is not None else None)
    merged = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        terms = mod.terms() if blend is None else [(n, w) for n, w in blend.items() if n in mod.scale]
        if not terms and not quant.is_quantized(mod.weight):
            continue
        dense = mod.dense_weight().detach()
        w = dense.float()
        for n, weight in terms:
            w = w + weight * mod.delta(n).detach().float()
        merged[f"{mod_name}.weight"] = w.to(dense.dtype)
    state = {}
    for n, t in model.state_dict().items():
        if ".lora_" in n:
            continue
        state[n] = merged.get(n, t)
    return state


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], saved_name: str, as_name: str,
                         rank: int, alpha: float, targets: Iterable[str]) -> None:
    """Add adapter ``as_name`` from tensors saved under ``saved_name`` (another name is fine:
    that is how two runs' ``default`` adapters share one base)."""
    add_lora(model, as_name, rank, alpha, 0.0, targets)
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        key2 = key.replace(f".lora_A_{saved_name}", f".lora_A_{as_name}").replace(
            f".lora_B_{saved_name}", f".lora_B_{as_name}")
        if key2 not in params:
            raise KeyError(f"adapter tensor {key!r} has no place in the model")
        with torch.no_grad():
            params[key2].copy_(t)


def qlora_unavailable_reason() -> str | None:
    """None when 4-bit base weights can be used here (on a CPU too), else why not."""
    return quant.unavailable_reason()


def quantize_base_4bit(model: nn.Module, double_quant: bool = True, adapter: str | None = None) -> int:
    """QLoRA: replace the frozen base weight of every LoRA layer (with ``adapter``: of those
    that hold it) with an NF4 ``Params4bit`` (``model.quant``; double quantization of the
    scales by default), on the device the weight is on. The adapters stay fp32. Returns the
    number of weights quantized. Only the single-device and DDP backends train such a model
    (``train.sft.config`` refuses the others)."""
    n = 0
    for m in lora_modules(model):
        if (adapter is None or adapter in m.scale) and not quant.is_quantized(m.weight):
            m.weight = quant.quantize(m.weight, double_quant)
            n += 1
    return n
