"""Parallelism backends. The trainer talks to one ``Backend``; the model never knows which."""

from train.backends.base import Backend


def build_backend(cfg) -> Backend:
    name = cfg.backend.name
    if name == "single":
        from train.backends.single import SingleBackend

        return SingleBackend(cfg)
    raise ValueError(f"config error: backend.name: backend {name!r} is not available in this build")


__all__ = ["Backend", "build_backend"]
