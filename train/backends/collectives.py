"""The host collectives every backend offers (``Backend`` inherits them): the few numbers and
objects ranks exchange about their batches, checkpoints and decisions, in one place. A
backend supplies ``rank``, ``world_size``, ``is_main`` and ``data_parallel_size``, and may
narrow ``_data_groups`` (tensor parallelism: a tp group reads one batch).

Host numbers and objects travel over a gloo group even when the default group is NCCL: an
NCCL collective of a host value would copy it to the GPU and read it back, a device sync
that stops the CPU from running ahead of the GPU.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from train.checkpoint.full_state import FullState


class RanksDisagree(RuntimeError):
    """Ranks reached the same collective with different work (see ``HostCollectives.agree``)."""


class HostCollectives:
    _host_group = None

    def _host(self):
        if self._host_group is None:
            self._host_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD
        return self._host_group

    def all_reduce_mean(self, value: float) -> float:
        if self.world_size == 1 or not dist.is_initialized():
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t, group=self._host())
        return float(t.item()) / self.world_size

    def _data_groups(self):
        """(host group, device group) of this rank's data-parallel ranks: all ranks (None
        for the device: the default group) unless tensor parallelism groups them."""
        return self._host(), None

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums over data-parallel ranks of a few host numbers about this rank's batches, in
        one collective (float64: token counts stay exact). A tensor-parallel group reads one
        batch: it is counted once."""
        if self.data_parallel_size == 1 or not dist.is_initialized():
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        dist.all_reduce(t, group=self._data_groups()[0])
        return t.tolist()

    def all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a device tensor about this rank's batches over data-parallel ranks, left on
        the device (no host read)."""
        if self.data_parallel_size > 1 and dist.is_initialized():
            dist.all_reduce(t, group=self._data_groups()[1])
        return t

    def all_gather_object(self, obj: Any) -> list:
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self._host())
        return out

    def gather_object(self, obj: Any) -> list:
        """Every rank's ``obj`` on rank 0 (the others get an empty list)."""
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._host())
        return out if self.is_main else []

    def broadcast_object(self, obj: Any) -> Any:
        if self.world_size == 1 or not dist.is_initialized():
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._host())
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def on_main(self, what: str, fn):
        """``fn()`` on rank 0 only (None elsewhere), e.g. reading a checkpoint once instead
        of once per rank. Its failure stops every rank: rank 0 re-raises it, the others
        raise RanksDisagree quoting it, instead of waiting in the next collective."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # told to the other ranks, then raised here
                error = e
        told = self.broadcast_object(f"{type(error).__name__}: {error}" if error is not None else None)
        if error is not None:
            raise error
        if told is not None:
            raise RanksDisagree(f"rank 0 failed {what}: {told}")
        return result

    def stream_from_main(self, tensors: Optional[dict]):
        """Yield rank 0's ``tensors`` (key -> CPU tensor) on every rank, one at a time: a
        rank never holds more than one of them beyond its own state (other ranks pass None)."""
        listing = [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()] if self.is_main else None
        for key, shape, dtype in self.broadcast_object(listing):
            t = tensors[key].contiguous() if self.is_main else torch.empty(shape, dtype=dtype)
            if self.world_size > 1 and dist.is_initialized():
                dist.broadcast(t, src=0, group=self._host())
            yield key, t

    def full_state_from_main(self, st: Optional[FullState]) -> FullState:
        """Rank 0's FullState on every rank (for backends that hold the whole model anyway)."""
        if self.world_size == 1 or not dist.is_initialized():
            return st
        flat = None
        if self.is_main:
            flat = {("model", n): t for n, t in st.model.items()}
            flat.update({(k, n): m[k] for n, m in st.moments.items() for k in m})
        out = FullState(model={}, step=self.broadcast_object(st.step if self.is_main else None))
        for (kind, name), t in self.stream_from_main(flat):
            if kind == "model":
                out.model[name] = t
            else:
                out.moments.setdefault(name, {})[kind] = t
        return out

    def agree(self, what: str, value: Any) -> Any:
        """Guard in front of collectives whose number depends on local work: every rank
        states ``value`` (a count, a step, a checksum, an error text); if they differ, every
        rank raises the same error naming each rank's value, at once, instead of pairing
        mismatched collectives until the process-group timeout."""
        values = self.all_gather_object(value)
        if any(v != values[0] for v in values):
            listing = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RanksDisagree(f"ranks disagree on {what} ({listing})")
        return values[0]
