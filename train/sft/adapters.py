"""LoRA adapter checkpoints after training: load several onto one base, switch, merge, export.

An adapter checkpoint (a step dir of a ``lora.enabled=true`` run) holds ``adapter.safetensors``
(adapter and, for classification, head tensors), ``adapter_config.json`` (rank, alpha,
targets, the base checkpoint's path as ``base`` and its identity as ``base_digest``) and the
usual model_config.yaml / tokenizer.model. Merging folds the adapter into the base weights
and writes a plain kiln checkpoint directory that ``launch/generate.py`` and
``launch/export_hf.py`` read like any other.

The base is loaded only if it is still the one the adapter was trained on: ``load_base``
computes ``init_digest`` of what ``base`` names now and refuses (``CheckpointError``) a
digest other than ``base_digest``, and an adapter_config.json that has no ``base_digest``
(written before kiln recorded it), unless the caller accepts the base explicitly
(``launch/merge_lora.py --accept-base``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

from model.llama import Transformer
from model.lora import load_adapter_tensors, merged_state_dict, quantize_base_4bit, set_active_adapter
from train import checkpoint as ckpt
from train.checkpoint import ADAPTER_CONFIG
from train.checkpoint.full_state import FullState, load_init_weights, read_adapter_state
from train.checkpoint.layout import ADAPTER_FILE, PROMPT_TUNING_CONFIG


def _config(step_dir: str, name: str, kind: str) -> dict:
    """A small JSON config of an adapter checkpoint, read as untrusted input (``read_json``:
    a regular file only, bad JSON a CheckpointError naming it)."""
    path = os.path.join(step_dir, name)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{step_dir} has no {name}: not a {kind} checkpoint")
    cfg = ckpt.read_json(path)
    if not isinstance(cfg, dict) or "base" not in cfg:
        raise ckpt.CheckpointError(f"{path}: not a {kind} configuration (no object with a 'base')")
    return cfg


def adapter_config(step_dir: str) -> dict:
    return _config(step_dir, ADAPTER_CONFIG, "LoRA")


def prompt_tuning_config(step_dir: str) -> dict:
    return _config(step_dir, PROMPT_TUNING_CONFIG, "prompt-tuning")


def _base_config(step_dir: str) -> tuple[str, dict]:
    """(file, config) of whichever kind of adapter checkpoint ``step_dir`` is."""
    if os.path.lexists(os.path.join(step_dir, PROMPT_TUNING_CONFIG)):
        return os.path.join(step_dir, PROMPT_TUNING_CONFIG), prompt_tuning_config(step_dir)
    return os.path.join(step_dir, ADAPTER_CONFIG), adapter_config(step_dir)


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _hf_weight_files(directory: str) -> list[str]:
    """The files ``hf_interop.load_hf_llama`` reads from ``directory``, in the order it looks."""
    from model.hf_interop import SAFE_INDEX

    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return ["config.json", SAFE_INDEX, *sorted(set(json.load(f)["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, name)):
            return ["config.json", name]
    raise ckpt.CheckpointError(f"{directory}: no model.safetensors, {SAFE_INDEX} or pytorch_model.bin")


def init_digest(path: str) -> str:
    """The identity of the starting weights ``init_from=path`` names, as they are now: what an
    adapter checkpoint stores as ``base_digest`` and a DPO reference cache as ``init_digest``.

    - a kiln checkpoint (step dir, checkpoints root or run dir): ``checkpoint.digest`` of the
      step directory it resolves to, i.e. sha256 of its manifest (every file's path, size and
      xxh3 content checksum). It reads meta.json only, so it is cheap on every rank, and a
      checkpoint retrained or rewritten at the same path gets a new one.
    - a weights directory (``convert_checkpoint --to weights``: no manifest): sha256 of the
      same manifest form computed from the content of model_config.yaml and model.safetensors.
    - ``hf:<dir>``: sha256 of the name, size and modification time (ns) of config.json and of
      every weight file the loader reads (the index and its shards, model.safetensors or
      pytorch_model.bin). Stat only, no content: an HF model is tens of GB, read by every rank
      at every start, and nothing retrains it in place; a new download or conversion rewrites
      the files and so changes their times. The price: a copy that does not keep times (``cp``
      without ``-p``) reads as another base (a refused adapter, a recomputed DPO cache), and a
      rewrite that keeps every size and time is not noticed.

    Raises CheckpointError naming ``path`` when it names nothing readable."""
    return identify(path)[0]


def identify(path: str) -> tuple[str, str]:
    """(``init_digest(path)``, the directory it describes: the step directory a kiln path
    resolves to, or the HF directory)."""
    if path.startswith("hf:"):
        directory = os.path.abspath(path[3:])
        if not os.path.isdir(directory):
            raise ckpt.CheckpointError(f"{path}: Hugging Face directory not found")
        files = {}
        for name in _hf_weight_files(directory):
            st = os.stat(os.path.join(directory, name))
            files[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return _sha256_json(files), directory
    step_dir = os.path.abspath(path)
    if not os.path.lexists(os.path.join(step_dir, ckpt.META)):
        step_dir = ckpt.resolve(path)  # a run dir or root: the checkpoint the loader picks (newest that verifies)
    if os.path.lexists(os.path.join(step_dir, ckpt.META)):
        return ckpt.digest(step_dir), step_dir  # the manifest; the loader verifies the files against it
    return _sha256_json({name: {"size": os.path.getsize(os.path.join(step_dir, name)),
                                ckpt.HASH: ckpt.file_digest(os.path.join(step_dir, name))}
                         for name in (ckpt.MODEL_CONFIG, ckpt.MODEL_FILE)}), step_dir


def check_base(step_dir: str, accept_base: bool = False) -> str:
    """The base of the adapter checkpoint ``step_dir``, after checking that it still holds the
    weights the adapter was trained on: ``init_digest(base)`` must equal adapter_config.json's
    ``base_digest``. A mismatch (the base retrained or replaced at its path since) or a missing
    ``base_digest`` (an adapter written before kiln recorded it) raises CheckpointError naming
    both digests and paths and what to do, unless ``accept_base``: then it is printed as a
    warning on stderr and the current base is used."""
    config, cfg = _base_config(step_dir)
    base, stored = str(cfg["base"]), cfg.get("base_digest")
    try:
        current, now = identify(base)
    except FileNotFoundError as e:  # a CheckpointNotFound, or a file gone from an HF directory
        raise ckpt.CheckpointError(f"the base {base} of the adapter {step_dir} cannot be read: {e}") from None
    if stored == current:
        return base
    merge = f"python launch/merge_lora.py {step_dir} <out dir> --accept-base"
    if stored is None:
        problem = (f"{config} names its base {base} by path only (no base_digest: it was written before kiln "
                   f"recorded the base's digest), so whether {now} (digest {current}) still holds the weights "
                   "the adapter was trained on cannot be checked.")
        todo = (f"If you know it does, merge the adapter onto it explicitly with `{merge}` and use the merged "
                f"checkpoint; otherwise retrain the adapter on the base (launch/sft.py init_from={base} "
                "lora.enabled=true), which records its digest.")
    else:
        problem = (f"the adapter {step_dir} was trained on base {base} with digest {stored}, but {now} now has "
                   f"digest {current}: the base was retrained or replaced since, and the adapter would be applied "
                   "to other weights.")
        todo = (f"Put the checkpoint with digest {stored} back at {base}, or retrain the adapter on the current "
                f"base (launch/sft.py init_from={base} lora.enabled=true); if the weights are the same in other "
                f"bytes (a converted checkpoint), merge explicitly with `{merge}`.")
    if not accept_base:
        raise ckpt.CheckpointError(f"{problem} {todo}")
    print(f"[kiln] warning: {problem} Using it anyway (--accept-base).", file=sys.stderr, flush=True)
    return base


def load_base(step_dir: str, accept_base: bool = False) -> Transformer:
    """The base model an adapter checkpoint was trained on (any backend's checkpoint format),
    once ``check_base`` has found it unchanged (CheckpointError otherwise)."""
    base = check_base(step_dir, accept_base)
    model = Transformer(ckpt.read_model_config(step_dir))
    load_init_weights(model, base)
    return model.eval()


def load_prompt_tuned(step_dir: str, accept_base: bool = False) -> Transformer:
    """The model a prompt-tuning run trained: its base (``load_base``: the digest recorded in
    prompt_tuning.json must match) with the virtual-token table of ``adapter.safetensors``
    (``model.prompt_tuning``; generation puts ``with_virtual_ids`` in front of each prompt).
    A table of another name or shape than prompt_tuning.json says is a CheckpointError."""
    from model.prompt_tuning import PROMPT, add_prompt_tuning, prompt_embedding
    from train.checkpoint.full_state import read_state_files

    cfg = prompt_tuning_config(step_dir)
    if cfg.get("task") == "classification":
        raise ValueError(f"{step_dir}: a classification prompt-tuning checkpoint has a head, not a language model")
    model = load_base(step_dir, accept_base)
    table = read_state_files(step_dir, False, ADAPTER_FILE).model
    n = cfg.get("n_tokens")
    want = (n, model.cfg.d_model)
    if set(table) != {PROMPT} or tuple(table[PROMPT].shape) != want:
        raise ckpt.CheckpointError(f"{os.path.join(step_dir, ADAPTER_FILE)}: holds "
                                   f"{ {k: tuple(v.shape) for k, v in table.items()} }, not {PROMPT} of shape {want} "
                                   f"({PROMPT_TUNING_CONFIG} says n_tokens={n!r})")
    add_prompt_tuning(model, n)
    with torch.no_grad():
        prompt_embedding(model).prompt.copy_(table[PROMPT])
    return model.eval()


def _check_same_base_precision(model: torch.nn.Module, quantize, source: str, targets=None) -> None:
    """Adapters on one model share its base weights: a QLoRA adapter needs them NF4-rounded,
    any other adapter needs them full precision. Adding one of the other kind would change the
    outputs of the adapters already there (or give the new one a base it was not trained on),
    so it is a ValueError naming both; so is a QLoRA adapter whose projections (``targets``)
    are not the ones already quantized (it would round, or miss, layers of the others' base)."""
    from model.lora import LoRALinear, lora_modules, target_modules
    from model.quant import is_quantized

    mods = lora_modules(model)
    present = sorted({a for m in mods for a in m.scale})
    if not present:
        return
    quantized = any(is_quantized(m.weight) for m in mods)
    if quantized != (quantize == "4bit"):
        have, new = ("QLoRA (4-bit NF4 base)", "full-precision") if quantized else \
            ("full-precision", "QLoRA (4-bit NF4 base)")
        raise ValueError(f"{source} is a {new} adapter, but the model already holds {have} adapters {present}: "
                         "they share the base weights, and one base cannot be both; load it on a separate "
                         "base model (train.sft.adapters.load_base)")
    if quantized and targets is not None:
        rounded = {n for n, m in model.named_modules() if isinstance(m, LoRALinear) and is_quantized(m.weight)}
        wanted = {f"{p}.{a}" for p, _, a in target_modules(model, targets)}
        if rounded != wanted:
            raise ValueError(f"{source} is a QLoRA adapter on {len(wanted)} projections, but the QLoRA adapters "
                             f"{present} already on the model quantized {len(rounded)} others or more "
                             f"(e.g. {sorted(rounded ^ wanted)[:3]}): QLoRA adapters share one base only with "
                             "the same targets; load it on a separate base model (train.sft.adapters.load_base)")


def add_adapter_from(model: torch.nn.Module, step_dir: str, name: str | None = None) -> str:
    """Put the adapter of ``step_dir`` on ``model`` under ``name`` (default: its own name) and
    make it active. Several adapters can be added to one base and switched with
    ``model.lora.set_active_adapter`` or blended (``model.adapter_mix``).

    An adapter trained with ``lora.quantize=4bit`` (QLoRA) saw the NF4-rounded base, not the
    full-precision one: its target projections are quantized again here (NF4 quantization
    is deterministic), so generation and ``merge_checkpoint`` reproduce the trained model.
    A QLoRA adapter and a full-precision one cannot share a model (ValueError): the
    quantization would change the other's outputs."""
    cfg = adapter_config(step_dir)
    name = name or cfg["name"]
    _check_same_base_precision(model, cfg.get("quantize"), step_dir, cfg["targets"])
    tensors = read_adapter_state(step_dir).model
    load_adapter_tensors(model, tensors, cfg["name"], name, cfg["rank"], cfg["alpha"], cfg["targets"])
    if cfg.get("quantize") == "4bit":
        quantize_base_4bit(model, adapter=name)
    set_active_adapter(model, name)
    return name


def merge_checkpoint(step_dir: str, out_dir: str, accept_base: bool = False) -> str:
    """Write base + adapter, merged, as a consolidated kiln checkpoint directory. The base must
    be the one the adapter was trained on (``check_base``; ``accept_base`` overrides). A QLoRA
    adapter is merged onto the dequantized NF4 base it was trained with (fp32 weights out)."""
    step_dir = ckpt.resolve(step_dir)
    if adapter_config(step_dir).get("task") == "classification":
        raise ValueError(f"{step_dir}: a classification adapter has a head, not a language model to export")
    model = load_base(step_dir, accept_base)
    add_adapter_from(model, step_dir)
    state = merged_state_dict(model)
    plain = Transformer(model.cfg)
    plain.load_state_dict(state, strict=True)  # proves the merged weights form a plain model
    os.makedirs(out_dir, exist_ok=True)
    FullState(model=plain.state_dict()).save(out_dir)
    ckpt.copy_carried(step_dir, out_dir, (ckpt.MODEL_CONFIG, ckpt.TOKENIZER, ckpt.CHAT_TEMPLATE, ckpt.CONFIG))
    return out_dir


def load_peft_adapter(model: torch.nn.Module, directory: str, name: str = "default") -> list[str]:
    """Add the PEFT LoRA adapter directory ``directory`` to a kiln ``Transformer`` as adapter
    ``name`` (active); returns the new parameter names. Its two files are read like a
    checkpoint's: regular files only (a symlink, FIFO or device is a CheckpointError naming
    it), malformed JSON a CheckpointError naming the file; a pickled ``adapter_model.bin`` is
    never read (UnsupportedAdapterError). ``model.peft_interop.add_peft_adapter`` checks the
    config and every factor's shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from model.peft_interop import PEFT_CONFIG, PEFT_WEIGHTS, UnsupportedAdapterError, add_peft_adapter, check_peft_config
    from train.checkpoint.reading import _regular

    config = os.path.join(directory, PEFT_CONFIG)
    if not os.path.lexists(config):
        raise FileNotFoundError(f"{directory} has no {PEFT_CONFIG}: not a PEFT adapter directory")
    cfg = check_peft_config(ckpt.read_json(config), config)
    _check_same_base_precision(model, None, directory)  # a PEFT LoRA adapter is full precision
    weights = os.path.join(directory, PEFT_WEIGHTS)
    if not os.path.lexists(weights):
        raise UnsupportedAdapterError("weights", sorted(os.listdir(directory)),
                                      f"no {PEFT_WEIGHTS} (a pickled adapter_model.bin is never read)")
    _regular(weights)
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise ckpt.CheckpointError(f"{weights}: cannot be read as safetensors ({e})") from None
    return add_peft_adapter(model, cfg, tensors, name)


def export_peft(step_dir: str, out_dir: str, accept_base: bool = False) -> dict:
    """Write the adapter of the LoRA checkpoint ``step_dir`` as a PEFT adapter directory
    (``model.peft_interop``) for ``PeftModel.from_pretrained`` on the base's HF export
    (``launch/export_hf.py <base> <hf dir>``). Returns the PEFT config written. A QLoRA
    adapter was trained on the NF4-rounded base; on the full-precision HF base it computes
    a slightly different model (the rounding), so this says so on stderr."""
    from model.peft_interop import save_peft_adapter

    step_dir = ckpt.resolve(step_dir)
    cfg = adapter_config(step_dir)
    if cfg.get("task") == "classification":
        raise ValueError(f"{step_dir}: a classification adapter has a head, which a PEFT causal-LM adapter cannot hold")
    base = check_base(step_dir, accept_base)
    with torch.device("meta"):  # the base weights are not needed: only the adapter's factors are written
        model = Transformer(ckpt.read_model_config(step_dir))
    load_adapter_tensors(model, read_adapter_state(step_dir).model, cfg["name"], cfg["name"], cfg["rank"],
                         cfg["alpha"], cfg["targets"])
    if cfg.get("quantize") == "4bit":
        print(f"[kiln] warning: {step_dir} was trained on 4-bit (NF4) base weights; PEFT applies it to the "
              "full-precision base, which differs by the rounding (merge_lora.py merges onto the NF4 base)",
              file=sys.stderr, flush=True)
    return save_peft_adapter(model, cfg["name"], out_dir, base_model_name_or_path=base,
                             dropout=float(cfg.get("dropout", 0.0)))


def merge_blend(weights: dict[str, float] | list[tuple[str, float]], out_dir: str, accept_base: bool = False) -> str:
    """Write a blend of LoRA adapter checkpoints, merged into their common base, as a plain kiln
    checkpoint directory: base + sum_i w_i * delta_i (``model.adapter_mix``). ``weights`` maps
    checkpoints (any spelling ``ckpt.resolve`` takes) to weights, as a dict or (path, weight)
    pairs. One step directory named twice (``runs/a`` and ``runs/a/checkpoints``, say) is
    refused: keyed by step directory, one of its weights would be silently dropped. Every
    adapter must have been trained on the same base (equal ``base_digest``) and that base must
    still be it (``check_base``); QLoRA and plain adapters are not blended together (they saw
    different bases). Carried files (tokenizer, chat template) come from the first adapter."""
    steps, given = {}, {}
    for p, w in (weights.items() if isinstance(weights, dict) else weights):
        s = ckpt.resolve(p)
        real = os.path.realpath(s)
        if real in given:
            raise ValueError(f"adapter checkpoint {real} is in the blend twice: as {given[real]!r} and as {p!r} "
                             "(give it once, with the sum of the weights if that is what is meant)")
        given[real] = p
        steps[s] = float(w)
    if not steps:
        raise ValueError("an adapter blend needs at least one adapter checkpoint")
    cfgs = {s: adapter_config(s) for s in steps}
    for s, c in cfgs.items():
        if c.get("task") == "classification":
            raise ValueError(f"{s}: a classification adapter has a head, not a language model to export")
        check_base(s, accept_base)
    if len({c.get("base_digest") for c in cfgs.values()}) != 1:
        raise ValueError("the adapters were trained on different bases (base_digest): " +
                         ", ".join(f"{s}: {c.get('base_digest')}" for s, c in cfgs.items()))
    if len({c.get("quantize") for c in cfgs.values()}) != 1:
        raise ValueError("QLoRA (lora.quantize=4bit) and full-precision adapters saw different bases: not blended")
    first = next(iter(steps))
    model = load_base(first, accept_base)
    blend = {add_adapter_from(model, s, f"blend{i}"): w for i, (s, w) in enumerate(steps.items())}
    plain = Transformer(model.cfg)
    plain.load_state_dict(merged_state_dict(model, blend), strict=True)  # proves the merged weights form a plain model
    os.makedirs(out_dir, exist_ok=True)
    FullState(model=plain.state_dict()).save(out_dir)
    ckpt.copy_carried(first, out_dir, (ckpt.MODEL_CONFIG, ckpt.TOKENIZER, ckpt.CHAT_TEMPLATE, ckpt.CONFIG))
    return out_dir
