"""Checkpoint directory layout, atomic writes and safe discovery.

Layout (the same for every backend)::

    <checkpoint root>/
      latest                  text file naming the newest complete checkpoint (moved last)
      step_00000100/
        meta.json             step, tokens, backend, world size, file manifest; written last
        trainer_state.json    step, tokens, data-stream state per rank, RNG states per rank
        config.yaml           the resolved run config
        tokenizer.model       the tokenizer travels with the weights
        model.safetensors     (single/ddp/consolidated) or backend-native shards
        optimizer.pt          (single/ddp) tensors and primitives only: loads with weights_only=True

A checkpoint is written into ``.tmp-step_N`` and renamed into place only once every file
and the manifest are on disk, then ``latest`` is replaced atomically. A crash at any point
leaves the previous checkpoint untouched, and ``find_latest`` only returns a directory
whose manifest matches the files present, so a truncated directory is never resumed.
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
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def manifest(directory: str) -> dict[str, int]:
    """Relative path -> size of every file under ``directory`` (except meta.json)."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            rel = os.path.relpath(path, directory)
            if rel != META:
                out[rel] = os.path.getsize(path)
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


def commit(root: str, tmp: str, step: int, meta: dict, keep_last: int) -> str:
    """Seal ``tmp`` with a manifest, move it into place, point ``latest`` at it, prune."""
    meta = dict(meta, step=step, files=manifest(tmp), complete=True, time=time.time())
    write_json_atomic(os.path.join(tmp, META), meta)
    _fsync_dir(tmp)
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


def is_complete(path: str) -> bool:
    """True when meta.json says complete and every listed file exists with its size."""
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return False
    if not meta.get("complete") or not isinstance(meta.get("files"), dict) or not meta["files"]:
        return False
    for rel, size in meta["files"].items():
        p = os.path.join(path, rel)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m:
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


def find_latest(root: str) -> Optional[str]:
    """The newest complete checkpoint under ``root``, or None.

    ``latest`` is tried first; if it is missing or names an incomplete directory (a crash
    between writes, a disk that filled up), the newest complete ``step_*`` wins.
    """
    try:
        with open(os.path.join(root, LATEST)) as f:
            named = os.path.join(root, f.read().strip())
        if _STEP_DIR.match(os.path.basename(named)) and is_complete(named):
            newer = [p for s, p in list_checkpoints(root) if p > named and is_complete(p)]
            return newer[-1] if newer else named
    except OSError:
        pass
    for _, path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
    return None


def prune(root: str, keep_last: int) -> None:
    complete = [p for _, p in list_checkpoints(root) if is_complete(p)]
    for path in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def read_trainer_state(path: str) -> dict:
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


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
