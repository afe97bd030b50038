"""Parallelism backends. The trainer talks to one ``Backend``; the model never knows which."""

from train.backends.base import Backend


def build_backend(cfg) -> Backend:
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
