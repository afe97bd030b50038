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

A checkpoint is untrusted input (people pass them around), and it is exactly the files its
manifest lists. Whatever the verify mode, ``verify`` refuses a checkpoint that holds a file
or directory the manifest does not list, a symbolic link anywhere (or is one), a special
file, or a manifest entry that is absolute or leaves the directory. Readers take their
paths from the manifest (``listed``, ``storage_format``, ``deepspeed_tag``), never from a
directory listing or a pointer file, so nothing added beside the listed files is ever read.
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
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# The exact names of what kiln's own saves leave behind when interrupted (begin, commit's
# replacement of a re-saved step, the atomic ``latest``): nothing else is ever cleaned.
_TEMP_NAME = re.compile(r"^(\.tmp-step_\d{8,}|\.latest\.tmp\d+|step_\d{8,}\.old\d+)$")
_DS_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
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


def commit(root: str, tmp: str, step: int, meta: dict, keep_last: int, verify_mode: str = "full") -> str:
    """Seal ``tmp`` with a manifest, move it into place, point ``latest`` at it, prune
    (checking older checkpoints with ``verify_mode``)."""
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
    _mark_verified(final)  # sealed from the files just written and fsynced
    prune(root, keep_last, keep=final, mode=verify_mode)
    return final


def _manifest_path_problem(rel) -> Optional[str]:
    """Why ``rel`` cannot name a file of a checkpoint (None: it can)."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if rel.startswith("/") or "\\" in rel or "\0" in rel:
        return "is absolute or not a plain relative path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or rel == META:
        return "leaves the checkpoint directory or is not a plain relative path"
    return None


def structure_problems(path: str, files: dict) -> list[str]:
    """What makes ``path`` more or other than the files its manifest lists: entries that
    name no plain path inside it, files and directories it does not list, links and
    special files (none of these are ever followed or read)."""
    problems = []
    if os.path.islink(path):
        return [f"{path}: is a symbolic link; a checkpoint is refused when it is or holds a link"]
    for rel in files:
        why = _manifest_path_problem(rel)
        if why:
            problems.append(f"{os.path.join(path, META)}: manifest entry {rel!r} {why}")
    listed_dirs = {"/".join(rel.split("/")[:i]) for rel in files if isinstance(rel, str)
                   for i in range(1, rel.count("/") + 1)}
    stack = [""]
    while stack:
        sub = stack.pop()
        try:
            entries = list(os.scandir(os.path.join(path, sub) if sub else path))
        except OSError as e:
            problems.append(f"{os.path.join(path, sub)}: cannot be listed ({e})")
            continue
        for entry in entries:
            rel = f"{sub}/{entry.name}" if sub else entry.name
            if entry.is_symlink():
                problems.append(f"{entry.path}: is a symbolic link; a checkpoint is refused when it holds a link")
            elif entry.is_dir(follow_symlinks=False):
                if rel not in listed_dirs:
                    problems.append(f"{entry.path}: directory not in the manifest (a checkpoint is exactly the files "
                                    "its manifest lists)")
                else:
                    stack.append(rel)
            elif not entry.is_file(follow_symlinks=False):
                problems.append(f"{entry.path}: not a regular file")
            elif rel != META and rel not in files:
                problems.append(f"{entry.path}: not in the manifest (a checkpoint is exactly the files its "
                                "manifest lists)")
    return problems


def verify(path: str, mode: str = "full") -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty: it is sound). ``mode``: full
    (sizes and content checksums), size (sizes only), off (neither). The structure is
    checked in every mode (``structure_problems``): it costs one directory listing."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"unknown verify mode {mode!r}")
    if os.path.islink(os.path.join(path, META)):
        return [f"{os.path.join(path, META)}: is a symbolic link; a checkpoint is refused when it holds a link"]
    try:
        meta = read_meta(path)
    except CheckpointError as e:
        return [str(e)]
    if not isinstance(meta, dict) or not meta.get("complete") or not isinstance(meta.get("files"), dict) \
            or not meta["files"]:
        return [f"{os.path.join(path, META)}: not marked complete or has no file manifest"]
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return [f"{os.path.join(path, META)}: field 'step' must be a non-negative integer, got {step!r}"]
    problems = structure_problems(path, meta["files"])
    if problems or mode == "off":
        return problems
    for rel, want in meta["files"].items():
        p = os.path.join(path, rel)
        want = want if isinstance(want, dict) else {"size": want}  # manifests before checksums: sizes only
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
        elif os.path.getsize(p) != want.get("size"):
            problems.append(f"{p}: {os.path.getsize(p)} bytes, the manifest says {want.get('size')}")
        elif mode == "full" and HASH in want and file_digest(p) != want[HASH]:
            problems.append(f"{p}: content checksum differs from the manifest (corrupted after it was written)")
    return problems


def listed(path: str) -> dict[str, dict]:
    """The manifest of the checkpoint at ``path``: relative path -> {size, checksum}. Readers
    ask this which files exist; a directory without a manifest lists nothing."""
    try:
        meta = read_meta(path)
    except CheckpointError:
        return {}
    files = meta.get("files") if isinstance(meta, dict) else None
    return files if isinstance(files, dict) else {}


def storage_format(path: str) -> str:
    """Which writer produced the checkpoint, from its manifest: 'full', 'dcp' or 'deepspeed'.
    A weights directory (``convert_checkpoint --to weights``, no manifest) is 'full'."""
    files = listed(path)
    if not files and not os.path.isfile(os.path.join(path, META)):
        if os.path.isfile(os.path.join(path, MODEL_FILE)) and not os.path.islink(os.path.join(path, MODEL_FILE)):
            return "full"
        raise CheckpointError(f"{path}: no kiln weights found (model.safetensors, dcp/ or deepspeed/)")
    formats = {fmt for fmt, prefix in (("deepspeed", DS_DIR + "/"), ("dcp", DCP_DIR + "/"))
               if any(rel.startswith(prefix) for rel in files)}
    if len(formats) > 1:
        raise CheckpointError(f"{path}: the manifest lists both {DS_DIR}/ and {DCP_DIR}/ weights; refusing to choose")
    if formats:
        return formats.pop()
    if MODEL_FILE in files:
        return "full"
    raise CheckpointError(f"{path}: its manifest lists no kiln weights (model.safetensors, dcp/ or deepspeed/)")


def deepspeed_tag(path: str) -> str:
    """The one DeepSpeed tag (subdirectory of ``deepspeed/``) the manifest lists; DeepSpeed's
    own ``latest`` pointer, when listed, must name it."""
    files = listed(path)
    tags = {rel.split("/")[1] for rel in files if rel.startswith(DS_DIR + "/") and rel.count("/") >= 2}
    if len(tags) != 1:
        raise CheckpointError(f"{path}: the manifest must list exactly one DeepSpeed tag directory under {DS_DIR}/, "
                              f"found {sorted(tags)}")
    tag = tags.pop()
    if not _DS_TAG.match(tag):
        raise CheckpointError(f"{path}: DeepSpeed tag {tag!r} is not a plain name")
    pointer = os.path.join(path, DS_DIR, "latest")
    if f"{DS_DIR}/latest" in files:
        with open(pointer) as f:
            named = f.read().strip()
        if named != tag:
            raise CheckpointError(f"{pointer}: names {named!r}, but the manifest lists the tag {tag!r}")
    return tag


def ds_files(path: str) -> list[str]:
    """Absolute paths of the DeepSpeed state files the manifest lists."""
    return [os.path.join(path, rel) for rel in sorted(listed(path)) if rel.startswith(DS_DIR + "/")]


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
    """(step, path) of every ``step_N`` directory under ``root``, oldest first. Only the
    canonical name of a step counts (``step_dir_name``), with any number of digits past 8."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and name == step_dir_name(int(m.group(1))):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out)


# Checkpoints this process has verified in full (written and sealed here, or chosen at
# resume), keyed by path with meta.json's identity: pruning asks this instead of hashing
# every older checkpoint again at each save.
_verified: dict[str, tuple] = {}


def _meta_key(path: str) -> Optional[tuple]:
    try:
        st = os.lstat(os.path.join(path, META))
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _mark_verified(path: str) -> None:
    key = _meta_key(path)
    if key is not None:
        _verified[os.path.abspath(path)] = key


def _verifies(path: str, mode: str) -> bool:
    key = _meta_key(path)
    if key is not None and _verified.get(os.path.abspath(path)) == key:
        return True
    ok = not verify(path, mode)
    if ok and mode == "full":
        _mark_verified(path)
    return ok


def select(root: str, mode: str = "full") -> tuple[Optional[str], list[tuple[str, list[str]]]]:
    """(the newest checkpoint under ``root`` that verifies, or None; [(newer checkpoint
    skipped, its problems)]). ``latest`` only names the newest complete save; the step
    directories themselves decide."""
    skipped = []
    for _, path in reversed(list_checkpoints(root)):
        problems = verify(path, mode)
        if not problems:
            if mode == "full":
                _mark_verified(path)
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
    if os.path.lexists(os.path.join(path, META)):
        problems = verify(path, mode)
        if problems:
            raise CheckpointError(f"checkpoint {path} does not verify:\n" + "\n".join(f"  {p}" for p in problems))
        if mode == "full":
            _mark_verified(path)
        return path
    if os.path.isfile(os.path.join(path, MODEL_CONFIG)) and os.path.isfile(os.path.join(path, MODEL_FILE)) \
            and not os.path.exists(os.path.join(path, META)):
        # weights written by convert_checkpoint --to weights: no manifest; safetensors and YAML only
        links = [n for n in (MODEL_CONFIG, MODEL_FILE) if os.path.islink(os.path.join(path, n))]
        if links or os.path.islink(path):
            raise CheckpointError(f"{path}: {links or 'the directory'} is a symbolic link; refusing to read it")
        return path
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
    """Remove what kiln's own interrupted saves leave behind, by their exact names
    (``.tmp-step_N``, ``.latest.tmp<pid>``, ``step_N.old<pid>``; never a link); returns what
    was removed. Step directories are kept, broken or not: ``select`` skips the broken ones
    and says so. Anything else (a user's ``step_N.old``, their notes) is not kiln's to touch."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not _TEMP_NAME.match(name) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    return removed


def prune(root: str, keep_last: int, keep: Optional[str] = None, mode: str = "full") -> list[str]:
    """Delete the older checkpoints beyond the newest ``keep_last`` ones that verify;
    returns what was deleted. A checkpoint that does not verify is neither counted nor
    deleted (it is evidence, and ``select`` skips it), so a verified checkpoint is never
    deleted while a broken one is kept in its place; ``keep`` (the one just written, which
    ``latest`` names) is never deleted. Each checkpoint is hashed at most once per process."""
    good, deleted = 0, []
    keep = os.path.abspath(keep) if keep else None
    for _, path in reversed(list_checkpoints(root)):
        if os.path.islink(path):
            continue
        if os.path.abspath(path) == keep:
            good += 1
            continue
        if not _verifies(path, mode):
            continue
        good += 1
        if good > keep_last:
            shutil.rmtree(path)
            _verified.pop(os.path.abspath(path), None)
            deleted.append(path)
    return deleted


def read_json(path: str) -> Any:
    """A checkpoint JSON file; any failure names the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None


def read_yaml(path: str) -> dict:
    """A checkpoint YAML file as plain containers, through OmegaConf's safe loader: a
    ``!!python/...`` tag, garbage or a missing file is a CheckpointError naming the file."""
    import yaml
    from omegaconf import OmegaConf

    if os.path.islink(path):
        raise CheckpointError(f"{path}: is a symbolic link; refusing to read it")
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
    m = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if m and int(m.group(1)) != state["step"]:
        raise CheckpointError(f"{file}: field 'step' is {state['step']}, but the directory is "
                              f"{os.path.basename(os.path.normpath(path))}")
    return state


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
