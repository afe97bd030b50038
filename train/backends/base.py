"""What the training loop needs from a parallelism backend.

The loop is written once against this interface: forward through ``backend.model``,
``backward(loss)`` for each micro-batch, ``step(lr)`` at the end of the accumulation
window, ``save``/``load`` for the backend-native part of a checkpoint. Everything a
backend does differently (DDP's gradient all-reduce, ZeRO partitioning, FSDP sharding)
stays behind it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import torch.distributed as dist

from train.backends.collectives import HostCollectives
from train.checkpoint.full_state import FullState
from train.checkpoint.writing import Writing


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("config error: train.device: cuda requested but no GPU is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """The one place kiln decides bf16: ``train.precision=bf16``, or ``auto`` on a GPU that
    supports it. The trainer's autocast, FSDP's MixedPrecisionPolicy and DeepSpeed's bf16
    block all read ``Backend.bf16``."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def init_distributed(backend: Backend, required: bool = False) -> None:
    """Join the process group the launcher (torchrun, deepspeed, srun, accelerate) described
    in the environment: nccl on GPUs, gloo on CPUs, unless backend.dist_backend says otherwise.
    ``required``: the backend needs a group even in one plain ``python`` process (FSDP's
    device mesh); it then gets a group of one on a free local port."""
    if dist.is_initialized():
        return
    choice = backend.cfg.backend.dist_backend
    if choice == "auto":
        choice = "nccl" if backend.device.type == "cuda" else "gloo"
    if backend.world_size > 1 or "MASTER_ADDR" in os.environ or required:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500" if backend.world_size > 1 else str(_free_port()))
        import datetime

        dist.init_process_group(choice, rank=backend.rank, world_size=backend.world_size,
                                timeout=datetime.timedelta(minutes=backend.cfg.backend.timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Backend(HostCollectives):
    name = "base"
    # Whether the backend gathers parameters in hooks that dynamo cannot trace (ZeRO-3's are
    # ``torch.compiler.disable``d): then only the blocks' ``forward`` is compiled, with the
    # hooks left to run eagerly around it (train/compile.py).
    compile_outside_hooks = False
    # Whether the model is built without its weights, inside ``model_init_context``, and each
    # rank fills only its own shard in ``setup`` (train/sharded_init.py): FSDP, ZeRO-3.
    builds_deferred = False
    # Whether the model it trains is the module itself (or a DDP wrapper of it) holding whole,
    # plain tensors: what 4-bit base weights (QLoRA) need, whose quant_state would not follow a
    # DTensor shard (FSDP) or a flattened ZeRO partition (DeepSpeed). Off unless a backend says so.
    holds_plain_modules = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = pick_device(cfg.train.device, self.local_rank)
        self.bf16 = uses_bf16(str(cfg.train.precision), self.device)
        self.model: Optional[torch.nn.Module] = None  # what the loop calls
        self.raw_model: Optional[torch.nn.Module] = None  # the unwrapped Transformer
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # -- set-up ---------------------------------------------------------------------
    def model_init_context(self):
        """The context the model is built in: nothing where the backend holds the whole model
        (it is built on the training device, ``sharded_init.build_on_device``)."""
        return contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel_size(self) -> int:
        """Ranks that read different micro-batches (the ranks of one tensor-parallel group
        read the same one)."""
        return self.world_size

    @property
    def data_parallel_rank(self) -> int:
        """This rank's index among the ``data_parallel_size`` data-parallel ranks: which
        micro-batches it reads (train/data.py)."""
        return self.rank

    def one_per_data_rank(self, values: list) -> list:
        """Of one value per rank (``all_gather_object``), those of one rank per
        data-parallel rank, in data-parallel order."""
        return values

    def setup(self, model: torch.nn.Module) -> None:
        """Place/wrap the model and build the optimizer."""
        raise NotImplementedError

    def zero3_offload(self, module: torch.nn.Module):
        """The owner of the ZeRO-3 hooks that gather ``module``'s parameters around each
        forward (DeepSpeed's ``DeepSpeedZeRoOffload``), for code that gathers them itself for
        many forwards (train/rl/rollout.py); None where nothing is partitioned that way."""
        return None

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` frozen, to run forward only (RL's reference policy), held as this backend
        holds trained weights: whole on every rank here; FSDP and ZeRO-3 shard it, so a second
        model costs a rank 1/world of its size rather than all of it."""
        return model.requires_grad_(False).eval().to(self.device)

    # -- one optimizer step -----------------------------------------------------------
    def micro_step_context(self, is_last: bool):
        """Context for forward+backward of one micro-batch (DDP skips all-reduce if not last)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, max_norm: float) -> float:
        """Clip, apply the optimizer at ``lr``, zero grads. Returns the pre-clip grad norm (a
        tensor or a float)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = self.clip_gradients(params, max_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()  # a tensor: read at logging steps only (reading it syncs the GPU)

    def clip_gradients(self, params: list, max_norm: float) -> torch.Tensor:
        """Scale the gradients of ``params`` to global norm ``max_norm`` at most (0: never);
        returns the pre-clip norm as a plain tensor."""
        if max_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor holding the global norm
            norm = norm.full_tensor()
        return norm

    # -- checkpoints ------------------------------------------------------------------
    def save(self, directory: str, background: bool = False) -> Writing:
        """Write this backend's model+optimizer state into ``directory`` (all ranks call).
        ``background``: return as soon as the state is copied out of the training tensors,
        the files being written while training goes on (where the backend can); the
        returned ``Writing`` says when this rank's files are complete."""
        raise NotImplementedError

    def load(self, directory: str, meta: dict) -> None:
        """Restore model+optimizer from a checkpoint written by any backend (all ranks call)."""
        raise NotImplementedError

    def export_full(self, trainable_only: bool = False) -> FullState:
        """Full (unsharded) weights and AdamW moments, on CPU, by parameter name: what
        portable checkpoints, conversions and adapter checkpoints hold. Gathering is
        collective under sharding: every rank calls, rank 0 holds the result.
        ``trainable_only``: only the parameters that train (LoRA adapters, a head)."""
        raise NotImplementedError

    def import_full(self, st: Optional[FullState], partial: bool = False) -> None:
        """Set weights and moments from rank 0's full tensors (other ranks may pass None),
        each rank keeping its part. ``partial``: ``st`` holds only some parameters (an
        adapter checkpoint). Collective."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Leave the process group once every rank is done: the barrier keeps a rank that
        finished early (rank 0 still writes reports) from tearing down its side first."""
        if dist.is_initialized():
            if self.world_size > 1:
                dist.barrier()
            dist.destroy_process_group()
