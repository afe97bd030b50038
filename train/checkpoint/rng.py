"""Random number generator states, JSON-safe, as trainer_state.json stores them per rank."""

from __future__ import annotations

import torch


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


class RNGStates:
    """The ``Stateful`` of the ranks' random number generators: field ``rng`` holds one
    state per rank. A checkpoint written by another number of ranks leaves this run's
    generators as they are (their streams then differ from any earlier run anyway)."""

    fields = ("rng",)

    def __init__(self, backend):
        self.b = backend

    def state_dict(self) -> dict:
        return {"rng": self.b.all_gather_object(rng_state())}

    def load_state_dict(self, state: dict) -> None:
        rngs = state.get("rng", [])
        if len(rngs) == self.b.world_size:
            set_rng_state(rngs[self.b.rank])
