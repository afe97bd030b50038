"""What a checkpoint is: exactly the files its manifest lists (size and xxh3-128 of each).
Verification, the structure check every mode runs, and the questions readers ask of the
manifest instead of the directory (which format, which DeepSpeed tag, which files)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from train.checkpoint.layout import (
    DCP_DIR,
    DS_DIR,
    DS_FILE,
    DS_TAG,
    HASH,
    META,
    MODEL_FILE,
    VERIFY_MODES,
    CheckpointError,
)
from train.checkpoint.reading import read_meta

CHUNK = 8 << 20


def file_digest(path: str) -> str:
    """xxh3-128 of a file's content (several GB/s per core: see the closing note of the
    checkpoint issue for the measured cost)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_of(directory: str) -> list[str]:
    """Relative paths of the files under ``directory`` (links not followed), but meta.json."""
    out = []
    for root, _, files in os.walk(directory):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), directory)
            if rel != META:
                out.append(rel)
    return sorted(out)


def hash_entries(directory: str, rels: list[str]) -> dict[str, dict]:
    """rel -> {size, xxh3_128} of these files, each fsynced first so that the manifest never
    describes data still in the page cache only."""
    out = {}
    for rel in rels:
        path = os.path.join(directory, rel)
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
        out[rel] = {"size": os.path.getsize(path), HASH: file_digest(path)}
    return out


def manifest(directory: str) -> dict[str, dict]:
    """Every file under ``directory`` (except meta.json), hashed in this process."""
    return hash_entries(directory, files_of(directory))


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


def verify(path: str, mode: str = "full", hash_files=None) -> list[str]:
    """What is wrong with the checkpoint at ``path`` (empty: it is sound). ``mode``: full
    (sizes and content checksums), size (sizes only), off (neither). The structure is
    checked in every mode (``structure_problems``): it costs one directory listing.
    ``hash_files`` (paths -> checksums) may share the hashing among ranks."""
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
    to_hash = {}
    for rel, want in meta["files"].items():
        p = os.path.join(path, rel)
        want = want if isinstance(want, dict) else {"size": want}  # manifests before checksums: sizes only
        if not os.path.isfile(p):
            problems.append(f"{p}: missing")
        elif os.path.getsize(p) != want.get("size"):
            problems.append(f"{p}: {os.path.getsize(p)} bytes, the manifest says {want.get('size')}")
        elif mode == "full" and HASH in want:
            to_hash[p] = want[HASH]
    if to_hash and not problems:
        got = (hash_files or local_hashes)(sorted(to_hash))
        problems += [f"{p}: content checksum differs from the manifest (corrupted after it was written)"
                     for p in sorted(to_hash) if got.get(p) != to_hash[p]]
    return problems


def local_hashes(paths: list[str]) -> dict[str, str]:
    """path -> content checksum, computed in this process."""
    return {p: file_digest(p) for p in paths}


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
    if not DS_TAG.match(tag):
        raise CheckpointError(f"{path}: DeepSpeed tag {tag!r} is not a plain name")
    # DeepSpeed's readers find their files by listing the tag directory and matching name
    # prefixes (mp_rank_*, *zero_pp_rank_*), then unpickle them with weights_only=False: so
    # every file there must be one of its state files by its exact name (and is vetted).
    odd = [rel for rel in files if rel.startswith(DS_DIR + "/") and not DS_FILE.match(rel[len(DS_DIR) + 1:])]
    if odd:
        raise CheckpointError(f"{path}: {odd[0]!r} is not a file DeepSpeed writes (its state files "
                              "*mp_rank_NN_{model,optim}_states.pt, latest, zero_to_*.py); refusing to let DeepSpeed "
                              "read the directory")
    pointer = os.path.join(path, DS_DIR, "latest")
    if f"{DS_DIR}/latest" in files:
        with open(pointer) as f:
            named = f.read().strip()
        if named != tag:
            raise CheckpointError(f"{pointer}: names {named!r}, but the manifest lists the tag {tag!r}")
    return tag


def dcp_files(path: str) -> set[str]:
    """Names (inside ``dcp/``) of the DCP files the manifest lists: the only files the DCP
    metadata may point at."""
    prefix = DCP_DIR + "/"
    return {rel[len(prefix):] for rel in listed(path) if rel.startswith(prefix)}


def ds_files(path: str) -> list[str]:
    """Absolute paths of the DeepSpeed state files the manifest lists."""
    return [os.path.join(path, rel) for rel in sorted(listed(path)) if rel.startswith(DS_DIR + "/")]


def digest(path: str) -> str:
    """The identity of the checkpoint at ``path``: sha256 of its manifest (every file's path,
    size and content checksum), so two checkpoints with the same digest hold the same bytes
    and a checkpoint retrained at the same path gets a new one. Whatever refers to a
    checkpoint (an adapter's base, a DPO reference cache, ``init_from``) stores this."""

    meta = read_meta(path)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{os.path.join(path, META)}: has no file manifest, so the checkpoint has no identity")
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_complete(path: str) -> bool:
    """Cheap check (sizes): every file of the manifest is there with its size."""
    return not verify(path, "size")
