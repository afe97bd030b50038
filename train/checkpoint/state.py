"""The pieces of a run that a checkpoint holds, as objects the ``CheckpointManager``
saves and loads without knowing what they are (torchtitan's ``Stateful``).

Two kinds, because a run holds two kinds of state:

- ``Stateful``: small state, as JSON values. Each piece owns named fields of
  trainer_state.json (``fields``: no two pieces share one); ``state_dict`` is called on
  every rank, because collecting a data position or the ranks' RNG states is collective,
  and rank 0's result is written. ``load_state_dict`` gets the piece's own fields of a
  checkpoint whose trainer_state.json was validated (``read_trainer_state``); a field an
  older checkpoint lacks is absent from the dict.
- ``FileState``: the weights and optimizer, written by the backend in its own format
  (safetensors, DCP shards per rank, DeepSpeed's files). Gathering them into one state
  dict on one rank is what sharded training exists to avoid, so this piece writes into
  the step directory itself (in the background where it can) and reads from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class Stateful(Protocol):
    fields: tuple[str, ...]

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class FileState(Protocol):
    def save(self, directory: str, background: bool):  # -> train.checkpoint.writing.Writing
        ...

    def load(self, directory: str, meta: dict) -> None: ...


@dataclass
class Progress:
    """Where training stands: optimizer steps taken, tokens trained on, and the global
    batches skipped before a step (``train.nan_policy=rollback``), which travel with the
    checkpoint so that a resumed run skips the same batches. Loaded in place: the trainer
    and the manager hold the same object."""

    step: int = 0
    tokens: int = 0
    skipped_batches: dict[int, int] = field(default_factory=dict)
    fields = ("step", "tokens", "skipped_batches")

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens,
                "skipped_batches": {str(k): v for k, v in self.skipped_batches.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.skipped_batches = {int(k): int(v) for k, v in state.get("skipped_batches", {}).items()}


@dataclass
class FilePiece:
    """A ``FileState`` from two functions: the trainer's weights and optimizer hooks,
    which tasks override (a LoRA run saves its adapters only)."""

    save: Callable
    load: Callable[[str, dict], None]
