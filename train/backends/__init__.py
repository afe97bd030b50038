"""Parallelism backends. The trainer talks to one ``Backend``; the model never knows which."""

from train.backends.base import Backend
from train.launcher import resolve_backend


def build_backend(cfg) -> Backend:
    """The backend ``cfg.backend.name`` names; ``auto`` is resolved first (train/launcher.py)."""
    resolve_backend(cfg)
    name = cfg.backend.name
    if name == "single":
        from train.backends.single import SingleBackend

        return SingleBackend(cfg)
    if name == "ddp":
        from train.backends.ddp import DDPBackend

        return DDPBackend(cfg)
    if name == "fsdp":
        from train.backends.fsdp import FSDPBackend

        return FSDPBackend(cfg)
    if name == "deepspeed":
        from train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg)
    raise ValueError(f"config error: backend.name: unknown backend {name!r}")


__all__ = ["Backend", "build_backend"]
