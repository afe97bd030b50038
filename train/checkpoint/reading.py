"""Reading a checkpoint's small files (JSON, YAML, trainer state) as untrusted input: any
failure, type or range error is a CheckpointError naming the file and the field."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from train.checkpoint.layout import META, MODEL_CONFIG, STEP_DIR, TRAINER_STATE, CheckpointError


def read_json(path: str) -> Any:
    """A checkpoint JSON file; any failure names the file. Only a regular file is opened (a
    link, a FIFO that would block, a device are refused)."""
    _regular(path)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None


def _regular(path: str) -> None:
    import stat

    try:
        mode = os.lstat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a link, FIFO or device is never read)")


def read_yaml(path: str) -> dict:
    """A checkpoint YAML file as plain containers, through OmegaConf's safe loader: a
    ``!!python/...`` tag, garbage or a missing file is a CheckpointError naming the file."""
    import yaml
    from omegaconf import OmegaConf

    _regular(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, ValueError, yaml.YAMLError, Exception) as e:  # omegaconf raises its own error types
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a mapping")
    return raw


def read_model_config(path: str):
    """The ``ModelConfig`` a checkpoint (or exported weights directory) was trained with."""
    from dataclasses import fields

    from model.llama import ModelConfig

    file = os.path.join(path, MODEL_CONFIG)
    raw = read_yaml(file)
    names = {f.name for f in fields(ModelConfig)}
    try:
        return ModelConfig(**{k: v for k, v in raw.items() if k in names})
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a model configuration ({e})") from None


def read_meta(path: str) -> dict:
    meta = read_json(os.path.join(path, META))
    if not isinstance(meta, dict):
        raise CheckpointError(f"{os.path.join(path, META)}: holds a {type(meta).__name__}, not an object")
    return meta


def _check_field(file: str, state: dict, name: str, ok, want: str) -> None:
    if name not in state or not ok(state[name]):
        raise CheckpointError(f"{file}: field {name!r} must be {want}, got {state.get(name, '<missing>')!r}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_trainer_state(path: str) -> dict:
    """``trainer_state.json``, its types and ranges checked: step and tokens non-negative
    integers, the step equal to meta.json's and to the directory name's, data and RNG lists,
    skipped batches by step. Anything else is a CheckpointError naming the file and field."""
    file = os.path.join(path, TRAINER_STATE)
    state = read_json(file)
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: holds a {type(state).__name__}, not an object")
    _check_field(file, state, "step", _is_count, "a non-negative integer")
    _check_field(file, state, "tokens", _is_count, "a non-negative integer")
    for name in ("data", "rng"):
        if name in state:
            _check_field(file, state, name, lambda v: isinstance(v, list), "a list")
    if any(not isinstance(r, dict) or not {"python", "numpy", "torch"} <= set(r) for r in state.get("rng", [])):
        raise CheckpointError(f"{file}: field 'rng' must hold one RNG state object per rank")
    if "skipped_batches" in state:
        _check_field(file, state, "skipped_batches", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and k.isdigit() and _is_count(n) for k, n in v.items()),
            "an object of step -> count (non-negative integers)")
    if os.path.isfile(os.path.join(path, META)):
        meta_step = read_meta(path).get("step")
        if meta_step != state["step"]:
            raise CheckpointError(f"{file}: field 'step' is {state['step']}, but meta.json says {meta_step!r}")
    m = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{file}: field 'step' is {state['step']}, but the directory is "
                              f"{os.path.basename(os.path.normpath(path))}")
    return state


def torch_load(path: str, map_location="cpu"):
    """Load tensors and primitives only: never unpickle arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)
