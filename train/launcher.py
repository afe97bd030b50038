"""Which launcher started this process, and which backend ``backend=auto`` therefore means.

This module is the one place that reads the launchers' environment variables for that
decision. A launcher starts N processes and tells each its rank; a backend that ignores
them trains N separate models, so ``backend.name=auto`` (the default) follows the
launcher:

* the DeepSpeed launcher (``deepspeed --num_gpus N``; it sets ``CROSS_RANK`` and passes
  ``--local_rank``) -> ``deepspeed`` with the configured ``backend.zero_stage``: a user who
  typed ``deepspeed`` wants ZeRO;
* torchrun, ``accelerate launch``, ``srun`` or any launcher that sets ``WORLD_SIZE`` > 1
  -> ``ddp``: every rank keeps the whole model, so numerics and checkpoints are exactly
  those of one process and the checkpoint is portable. Models that do not fit one device
  need sharding, and that is a choice the user states: ``backend=fsdp`` (or ``deepspeed``);
* one process -> ``single``.

An explicit ``backend=single`` with more than one process is a config error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

BACKENDS = ("auto", "single", "ddp", "deepspeed", "fsdp")


@dataclass(frozen=True)
class Launch:
    launcher: str  # python | deepspeed | torchrun | accelerate | srun | env
    world_size: int


def detect_launch(env: Mapping[str, str] | None = None) -> Launch:
    """What started this process, from the variables each launcher sets."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if "CROSS_RANK" in env:  # set by deepspeed.launcher.launch on every node
        launcher = "deepspeed"
    elif any(k.startswith("ACCELERATE_") for k in env) and "TORCHELASTIC_RUN_ID" in env:
        launcher = "accelerate"
    elif "TORCHELASTIC_RUN_ID" in env:
        launcher = "torchrun"
    elif "SLURM_PROCID" in env and "RANK" in env:
        launcher = "srun"
    elif "WORLD_SIZE" in env:
        launcher = "env"
    else:
        launcher = "python"
    return Launch(launcher, world)


def choose_backend(requested: str, zero_stage: int, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(backend name, why) for ``backend.name=requested``. Raises ValueError for a choice
    that would silently train separate models."""
    launch = detect_launch(env)
    n = launch.world_size
    started = f"{launch.launcher} started {n} process{'es' if n != 1 else ''}"
    if requested == "single" and n > 1:
        raise ValueError(f"backend=single runs one process, but {started} (WORLD_SIZE={n}): each would train a "
                         "model of its own. Use backend=ddp or backend=fsdp (torchrun, srun, accelerate), "
                         "backend=deepspeed (deepspeed launcher), or leave backend unset to follow the launcher")
    if requested != "auto":
        return requested, "set in the config"
    if launch.launcher == "deepspeed":
        return "deepspeed", f"auto: {started}; ZeRO stage {zero_stage} (backend.zero_stage)"
    if n > 1:
        return "ddp", (f"auto: {started}; DDP keeps a full model per rank (set backend=fsdp or backend=deepspeed "
                       "to shard a model that does not fit one device)")
    return "single", "auto: one process"


def resolve_backend(cfg) -> str:
    """Replace ``backend.name=auto`` in ``cfg`` by the concrete choice (idempotent), so
    every reader of the config and every checkpoint sees what actually ran. Returns why."""
    from train.errors import ConfigError

    try:
        name, why = choose_backend(str(cfg.backend.name), int(cfg.backend.zero_stage))
    except ValueError as e:
        raise ConfigError("backend.name", str(e)) from None
    if name != cfg.backend.name:
        cfg.backend.name = name
        cfg.backend.chosen_because = why
    elif not cfg.backend.get("chosen_because"):
        cfg.backend.chosen_because = why
    return str(cfg.backend.chosen_because)
