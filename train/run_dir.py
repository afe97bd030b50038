"""What a launch writes into its run directory, and when.

Start-up checks everything (config, checkpoints) before it writes: a start that fails
changes nothing on disk. Hydra is told not to write the job's config files
(``hydra.output_subdir: null`` in conf/*.yaml); kiln writes the same files, with the same
content, to ``<run_dir>/.hydra/`` (config.yaml, hydra.yaml, overrides.yaml) once the
start succeeded (``record_run_config``).

Hydra still creates its run directory (``hydra.run.dir``, the run dir) and opens its job
log there (``<run_dir>/<job>.log``) before the launch script's ``main`` runs. So the launch
notes, before Hydra runs (launch/_bootstrap.py ``check_overrides``), which of these
directories exist and what they hold; a start that fails (``discard_failed_start``)
removes a run directory this launch created, with the parents it created, and the empty
job log it added to an existing one. Nothing else is ever deleted: not a file or directory
kiln did not create, nothing in a run directory another live kiln process holds
(train/run_lock.py), nothing once the start succeeded.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Any, Optional

CONFIG_DIR = ".hydra"
FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")

# abs path of a directory this launch runs in -> the highest of it and its parents that did
# not exist before Hydra ran (None: it existed) ...
_new_top: dict[str, Optional[str]] = {}
# ... and, for one that existed, the names it held then
_held_before: dict[str, set[str]] = {}
# the job as Hydra handed it over: {"id": id(cfg), "config.yaml": text, ...}
_job: dict[str, Any] = {}
_started = False


def _highest_missing(path: str) -> Optional[str]:
    top = None
    while not os.path.lexists(path):
        top = path
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return top


def note_launch(*dirs: str) -> None:
    """Before Hydra runs: which of the directories this launch runs in (Hydra's run dir,
    the config's run_dir) exist, and what they hold."""
    for d in dirs:
        path = os.path.abspath(d)
        top = _highest_missing(path)
        _new_top[path] = top
        if top is None and os.path.isdir(path):
            try:
                _held_before[path] = set(os.listdir(path))
            except OSError:
                _held_before[path] = set()


def note_job(cfg: Any) -> None:
    """At the start of the job (the launch script's ``main``, handed ``cfg`` by Hydra): the
    text of the files Hydra would have written to ``<run_dir>/.hydra/`` at this point."""
    from omegaconf import OmegaConf

    _job.clear()
    _job["id"] = id(cfg)
    _job["config.yaml"] = OmegaConf.to_yaml(cfg)
    hydra = _hydra_config()
    if hydra is not None:
        _job["hydra.yaml"] = OmegaConf.to_yaml(hydra)
        _job["overrides.yaml"] = OmegaConf.to_yaml(hydra.hydra.overrides.task)


def _hydra_config():
    """Hydra's own config of this job ({"hydra": ...}) while a Hydra job runs, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.instance().cfg if HydraConfig.initialized() else None
    except Exception:
        return None


def started() -> bool:
    return _started


def _write_atomic(path: str, text: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def record_run_config(cfg: Any, run_dir: str) -> str:
    """The start succeeded: write ``<run_dir>/.hydra/{config,hydra,overrides}.yaml`` as Hydra
    would have (the job's config as Hydra handed it to ``main``, before kiln resolved
    anything in it; Hydra's config of the job; the command-line overrides), each file
    replaced atomically. From now on a failure deletes nothing. Called by the main rank;
    returns the directory. Outside a Hydra job (a config composed in a test) only
    config.yaml is written, from ``cfg`` as it is."""
    global _started
    _started = True
    from omegaconf import OmegaConf

    if _job.get("id") == id(cfg):
        texts = {name: _job[name] for name in FILES if name in _job}
    else:
        texts = {"config.yaml": OmegaConf.to_yaml(cfg)}
        hydra = _hydra_config()
        if hydra is not None:
            texts["hydra.yaml"] = OmegaConf.to_yaml(hydra)
            texts["overrides.yaml"] = OmegaConf.to_yaml(hydra.hydra.overrides.task)
    out = os.path.join(run_dir, CONFIG_DIR)
    os.makedirs(out, exist_ok=True)
    for name, text in texts.items():
        _write_atomic(os.path.join(out, name), text)
    try:
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return out


_RUN_OUTPUT = re.compile(r"^(step_\d+|latest|metrics\.jsonl)$")


def _holds_run_output(path: str) -> bool:
    """A checkpoint or metrics under ``path``: what only a start that went ahead writes."""
    for _, dirs, files in os.walk(path):
        if any(_RUN_OUTPUT.match(n) for n in dirs + files):
            return True
    return False


def _job_log() -> Optional[str]:
    """The job log Hydra opened for this job, if any."""
    hydra = _hydra_config()
    try:
        return os.path.abspath(str(hydra.hydra.job_logging.handlers.file.filename)) if hydra is not None else None
    except Exception:
        return None


def discard_failed_start() -> list[str]:
    """The start failed: undo what this launch did to its run directories. A directory this
    launch created (and the parents it created) is removed, unless another live kiln
    process holds it or it holds a checkpoint or metrics; in a directory that existed,
    only the empty job log this launch added is removed and this process's run-directory
    lock is put back as it was. Nothing happens once the start succeeded, on ranks other
    than 0, or for a directory not noted before Hydra ran. Returns what was removed."""
    from train import run_lock
    from train.errors import ConfigError

    if _started or os.environ.get("RANK", "0") != "0":
        return []
    removed = []
    log = _job_log()
    for path, top in _new_top.items():
        if top is None:  # existed: remove only what this launch added, then put the lock back
            if log is not None and os.path.dirname(log) == path and os.path.basename(log) not in \
                    _held_before.get(path, {os.path.basename(log)}):
                try:
                    if os.path.isfile(log) and not os.path.islink(log) and os.path.getsize(log) == 0:
                        os.unlink(log)
                        removed.append(log)
                except OSError:
                    pass
            lock = run_lock.held(path)
            if lock is not None:
                lock.undo()
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            if _holds_run_output(path):
                continue
            lock = run_lock.held(path)
            if lock is None:
                try:
                    lock = run_lock.acquire(path)
                except (ConfigError, OSError):  # another kiln process runs here now: not ours to remove
                    continue
            shutil.rmtree(path, ignore_errors=True)
            lock.release()
            if not os.path.lexists(path):
                removed.append(path)
        d = os.path.dirname(path)  # the parents this launch created, while empty
        while top is not None and (d == top or d.startswith(top + os.sep)):
            try:
                os.rmdir(d)
            except OSError:
                break
            removed.append(d)
            d = os.path.dirname(d)
    if removed:
        print(f"[kiln] the start failed: removed {', '.join(removed)}, made by this launch", file=sys.stderr, flush=True)
    return removed
