"""The checkpoint directory: its layout, atomic writes, content checksums and safe discovery.

Layout (the same for every backend)::

    <checkpoint root>/
      latest                  text file naming the newest complete checkpoint (moved last)
      step_00000100/
        meta.json             step, tokens, backend, world size, manifest; written last
        trainer_state.json    step, tokens, data-stream state, RNG states per rank
        config.yaml           the resolved run config
        model_config.yaml     the architecture
        tokenizer.model       the tokenizer travels with the weights
        model.safetensors     (single/ddp/consolidated) full weights
        optimizer.safetensors (single/ddp/consolidated) AdamW moments by parameter name
        dcp/ | deepspeed/     (fsdp | deepspeed) the backend's native shards

A checkpoint is written into ``.tmp-step_N``; every file is fsynced and hashed into the
manifest (size and xxh3-128 of its content), then the directory is renamed into place and
``latest`` is replaced atomically. A crash at any point leaves the previous checkpoint
untouched. ``verify`` checks a directory against its manifest (``full``: contents,
``size``: sizes only), and ``select`` returns the newest checkpoint that verifies together
with the ones it skipped and why, so a truncated, bit-flipped or half-copied directory is
never resumed silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Any, Optional

import torch

META = "meta.json"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
MODEL_CONFIG = "model_config.yaml"
TOKENIZER = "tokenizer.model"
CHAT_TEMPLATE = "chat_template.jinja"
MODEL_FILE = "model.safetensors"  # full weights (single, ddp, converted)
OPTIM_FILE = "optimizer.safetensors"  # AdamW moments by parameter name
DCP_DIR = "dcp"  # fsdp: torch.distributed.checkpoint
DS_DIR = "deepspeed"  # deepspeed: its own shards
ADAPTER_FILE = "adapter.safetensors"  # LoRA runs: adapters (and a head) instead of full weights
ADAPTER_OPTIM_FILE = "adapter_optimizer.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
LABELS_FILE = "labels.json"  # classification runs
# What travels with the weights whenever a checkpoint is converted or merged.
CARRIED = (TRAINER_STATE, CONFIG, MODEL_CONFIG, TOKENIZER, CHAT_TEMPLATE)
HASH = "xxh3_128"
VERIFY_MODES = ("full", "size", "off")
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the directory and the file."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No kiln checkpoint at all where one was expected."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def file_digest(path: str) -> str:
    """xxh3-128 of a file's content (several GB/s per core: see the closing note of the
    checkpoint issue for the measured cost)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest(directory: str) -> dict[str, dict]:
    """Relative path -> {size, xxh3_128} of every file under ``directory`` (except meta.json),
    each fsynced first so that the manifest never describes data still in the page cache only."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, directory)
            if rel == META:
                continue
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            out[rel] = {"size": os.path.getsize(path), HASH: file_digest(path)}
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin(root: str, step: int) -> str:
    """Create (fresh) the temporary directory a checkpoint is written into."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def seal(directory: str, meta: dict) -> None:
    """Write ``meta`` with the manifest of ``directory`` as its last file (the mark of a
    complete checkpoint); ``meta`` must hold ``step``."""
    meta = dict(meta, files=manifest(directory), complete=True, time=time.time())
    write_json_atomic(os.path.join(directory, META), meta)
    _fsync_dir(directory)


def copy_carried(src: str, dst: str, names=CARRIED) -> None:
    """Copy the files of ``names`` that ``src`` has into ``dst``."""
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def commit(root: str, tmp: str, step: int, meta: dict, keep_last: int) -> str:
    """Seal ``tmp`` with a manifest, move it into place, point ``latest`` at it, prune."""
    seal(tmp, dict(meta, step=step))
    final = os.path.join(root, step_dir_name(step))
    if os.path.exists(final):  # re-saving the same step (e.g. resumed then stopped at once)
        old = final + f".old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    tmp_latest = os.path.join(root, f".{LATEST}.tmp{os.getpid()}")
    with open(tmp_latest, "w") as f:
        f.write(step_dir_name(step) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_latest, os.path.join(root, LATEST))
    _fsync_dir(root)
    prune(root, keep_last)
    return final


def verify(path: str, mode: str = "full") -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty: it is sound). ``mode``: full
    (sizes and content checksums), size (sizes only), off (nothing is checked)."""
    if mode == "off":
        return []
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return [str(e)]
    if not meta.get("complete") or not isinstance(meta.get("files"), dict) or not meta["files"]:
        return [f"{os.path.join(path, META)}: not marked complete or has no file manifest"]
    problems = []
    for rel, want in meta["files"].items():
        p = os.path.join(path, rel)
        want = want if isinstance(want, dict) else {"size": want}  # manifests before checksums: sizes only
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
        elif os.path.getsize(p) != want["size"]:
            problems.append(f"{p}: {os.path.getsize(p)} bytes, the manifest says {want['size']}")
        elif mode == "full" and HASH in want and file_digest(p) != want[HASH]:
            problems.append(f"{p}: content checksum differs from the manifest (corrupted after it was written)")
    return problems


def digest(path: str) -> str:
    """The identity of the checkpoint at ``path``: sha256 of its manifest (every file's path,
    size and content checksum), so two checkpoints with the same digest hold the same bytes
    and a checkpoint retrained at the same path gets a new one. Whatever refers to a
    checkpoint (an adapter's base, a DPO reference cache, ``init_from``) stores this."""
    import hashlib

    meta = read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{os.path.join(path, META)}: has no file manifest, so the checkpoint has no identity")
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_complete(path: str) -> bool:
    """Cheap check (sizes): every file of the manifest is there with its size."""
    return not verify(path, "size")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def select(root: str, mode: str = "full") -> tuple[Optional[str], list[tuple[str, list[str]]]]:
    """(the newest checkpoint under ``root`` that verifies, or None; [(newer checkpoint
    skipped, its problems)]). ``latest`` only names the newest complete save; the step
    directories themselves decide."""
    skipped = []
    for _, path in reversed(list_checkpoints(root)):
        problems = verify(path, mode)
        if not problems:
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def find_latest(root: str, mode: str = "size") -> Optional[str]:
    """The newest checkpoint under ``root`` that verifies, or None."""
    return select(root, mode)[0]


def resolve(path: str, mode: str = "full") -> str:
    """The step directory to read from ``path``: a step directory (checked as it is), or a
    checkpoints root or run directory (its newest checkpoint that verifies; newer ones that
    do not are reported on stderr). Raises CheckpointError naming what is wrong."""
    import sys

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, META)):
        problems = verify(path, mode)
        if problems:
            raise CheckpointError(f"checkpoint {path} does not verify:\n" + "\n".join(f"  {p}" for p in problems))
        return path
    if os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isfile(os.path.join(path, MODEL_FILE)):
        return path  # weights written by convert_checkpoint --to weights: no manifest to check
    for root in (path, os.path.join(path, "checkpoints")):
        found, skipped = select(root, mode)
        if skipped:
            if found is None:
                raise CheckpointError(f"no checkpoint under {root} verifies:\n{describe_skipped(skipped)}")
            print(f"[kiln] {root}: skipped checkpoints that do not verify:\n{describe_skipped(skipped)}\n"
                  f"[kiln] using {found}", file=sys.stderr, flush=True)
        if found:
            return found
    raise CheckpointNotFound(f"no complete kiln checkpoint at {path} (expected a step_* directory, a checkpoints "
                          "root or a run directory)")


def describe_skipped(skipped: list[tuple[str, list[str]]]) -> str:
    return "\n".join(f"  {p}: " + "; ".join(problems) for p, problems in skipped)


def clean_stale(root: str) -> list[str]:
    """Remove what interrupted saves leave behind (``.tmp-step_*`` directories, ``.latest.tmp*``
    files, ``step_*.old*`` directories); returns what was removed. Step directories are kept,
    broken or not: ``select`` skips the broken ones and says so."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        if name.startswith((".tmp-step_", f".{LATEST}.tmp")) or (name.startswith("step_") and ".old" in name):
            path = os.path.join(root, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            removed.append(path)
    return removed


def prune(root: str, keep_last: int) -> None:
    complete = [p for _, p in list_checkpoints(root) if is_complete(p)]
    for path in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_json(path: str) -> Any:
    """A checkpoint JSON file; any failure names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None


def read_model_config(path: str):
    """The ``ModelConfig`` a checkpoint (or exported weights directory) was trained with."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from model.llama import ModelConfig

    file = os.path.join(path, MODEL_CONFIG)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    names = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in raw.items() if k in names})


def read_meta(path: str) -> dict:
    return read_json(os.path.join(path, META))


def read_trainer_state(path: str) -> dict:
    return read_json(os.path.join(path, TRAINER_STATE))


def torch_load(path: str, map_location="cpu"):
    """Load tensors and primitives only: never unpickle arbitrary objects."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ---- RNG state, JSON-safe ---------------------------------------------------------

def rng_state() -> dict:
    import random

    import numpy as np

    st = np.random.get_state()
    out = {
        "python": _to_jsonable(random.getstate()),
        "numpy": [st[0], st[1].tolist(), int(st[2]), int(st[3]), float(st[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


def _to_jsonable(x):
    if isinstance(x, tuple):
        return [_to_jsonable(v) for v in x]
    return x


def _to_tuple(x):
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x
