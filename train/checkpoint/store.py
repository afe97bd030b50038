"""Writing, choosing and cleaning checkpoints under a checkpoint root: atomic saves, the
``latest`` pointer, selection of the newest that verifies, pruning and start-up clean-up."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any, Optional

from train.checkpoint.layout import (
    CARRIED,
    LATEST,
    META,
    MODEL_CONFIG,
    MODEL_FILE,
    TEMP_NAME,
    CheckpointError,
    CheckpointNotFound,
    list_checkpoints,
    pruned_name,
    step_dir_name,
)
from train.checkpoint.manifest import files_of, hash_entries, verify


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


def seal(directory: str, meta: dict, files: Optional[dict] = None) -> None:
    """Write ``meta`` with the manifest of ``directory`` as its last file (the mark of a
    complete checkpoint); ``meta`` must hold ``step``. ``files``: the entries the ranks
    hashed, each its own files; any file on disk they did not cover is hashed here, and an
    entry for a file that is not there is an error."""
    on_disk = files_of(directory)
    files = dict(files or {})
    gone = sorted(set(files) - set(on_disk))
    if gone:
        raise CheckpointError(f"{directory}: hashed files that are not there: {gone[:5]}")
    files.update(hash_entries(directory, [rel for rel in on_disk if rel not in files]))
    meta = dict(meta, files=files, complete=True, time=time.time())
    write_json_atomic(os.path.join(directory, META), meta)
    _fsync_dir(directory)


def copy_carried(src: str, dst: str, names=CARRIED) -> None:
    """Copy the files of ``names`` that ``src`` has into ``dst``."""
    for name in names:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


def commit(root: str, tmp: str, step: int, meta: dict, keep_last: int, verify_mode: str = "full",
           files: Optional[dict] = None) -> str:
    """Seal ``tmp`` with a manifest (``files``: entries already hashed), move it into place,
    point ``latest`` at it, prune (checking older checkpoints with ``verify_mode``; their
    deletion runs in the background: ``wait_for_deletions``)."""
    seal(tmp, dict(meta, step=step), files)
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
    prune(root, keep_last, keep=final, mode=verify_mode, background=True)
    return final


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


def select(root: str, mode: str = "full", hash_files=None) -> tuple[Optional[str], list[tuple[str, list[str]]]]:
    """(the newest checkpoint under ``root`` that verifies, or None; [(newer checkpoint
    skipped, its problems)]). ``latest`` only names the newest complete save; the step
    directories themselves decide."""
    skipped = []
    for _, path in reversed(list_checkpoints(root)):
        problems = verify(path, mode, hash_files)
        if not problems:
            if mode == "full":
                _mark_verified(path)
            return path, skipped
        skipped.append((path, problems))
    return None, skipped


def find_latest(root: str, mode: str = "size") -> Optional[str]:
    """The newest checkpoint under ``root`` that verifies, or None."""
    return select(root, mode)[0]


def resolve(path: str, mode: str = "full", hash_files=None) -> str:
    """The step directory to read from ``path``: a step directory (checked as it is), or a
    checkpoints root or run directory (its newest checkpoint that verifies; newer ones that
    do not are reported on stderr). Raises CheckpointError naming what is wrong."""

    path = os.path.abspath(path)
    if os.path.lexists(os.path.join(path, META)):
        problems = verify(path, mode, hash_files)
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
        found, skipped = select(root, mode, hash_files)
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
    (``.tmp-step_N``, ``.latest.tmp<pid>``, ``step_N.old<pid>``, ``.pruned-step_N``; never a
    link); returns what
    was removed. Step directories are kept, broken or not: ``select`` skips the broken ones
    and says so. Anything else (a user's ``step_N.old``, their notes) is not kiln's to touch."""
    removed = []
    if not os.path.isdir(root):
        return removed
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if not TEMP_NAME.match(name) or os.path.islink(path):
            continue
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
        removed.append(path)
    return removed


_deletions = None  # Future of the background deletion of pruned checkpoints


def wait_for_deletions() -> None:
    """Block until the pruned checkpoints handed to the background are deleted."""
    global _deletions
    if _deletions is not None:
        _deletions.result()
        _deletions = None


def _delete(paths: list[str], background: bool) -> None:
    """Rename each doomed checkpoint to its ``pruned_name`` (atomic: it is no checkpoint from
    then on, and a crash leaves a name ``clean_stale`` removes), then delete it, in a thread
    of its own where ``background`` (deleting 12 GB takes seconds, 1 TB minutes)."""
    global _deletions
    doomed = []
    for path in paths:
        gone = os.path.join(os.path.dirname(path), pruned_name(os.path.basename(path)))
        if os.path.isdir(gone) and not os.path.islink(gone):  # an earlier deletion's leftover
            shutil.rmtree(gone, ignore_errors=True)
        os.replace(path, gone)
        doomed.append(gone)
    wait_for_deletions()  # one at a time

    def delete() -> None:
        for path in doomed:
            shutil.rmtree(path, ignore_errors=True)

    if not background:
        return delete()
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-prune")
    _deletions = pool.submit(delete)
    pool.shutdown(wait=False)


def prune(root: str, keep_last: int, keep: Optional[str] = None, mode: str = "full",
          background: bool = False) -> list[str]:
    """Delete the older checkpoints beyond the newest ``keep_last`` ones that verify;
    returns what was deleted. A checkpoint that does not verify is neither counted nor
    deleted (it is evidence, and ``select`` skips it), so a verified checkpoint is never
    deleted while a broken one is kept in its place; ``keep`` (the one just written, which
    ``latest`` names) is never deleted. Each checkpoint is hashed at most once per process.
    A deleted checkpoint is gone from the checkpoint list on return; with ``background``
    its files are removed by a thread (``wait_for_deletions``)."""
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
            _verified.pop(os.path.abspath(path), None)
            deleted.append(path)
    _delete(deleted, background)
    return deleted
