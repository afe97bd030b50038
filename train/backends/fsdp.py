"""FSDP2: ``fully_shard`` on every transformer block and on the root.

Parameters, gradients and optimizer state are sharded across ranks (or, with
``backend.hybrid_shard``, sharded within a node and replicated across nodes). Checkpoints
are torch.distributed.checkpoint directories, which DCP reshards on load, so a run saved
on N ranks resumes on M. Portable full checkpoints (single/DDP/converted DeepSpeed) load
too: rank 0 reads the full tensors and broadcasts them one by one, each rank keeping its
shard. A model built on the meta device (``train/sharded_init.py``) is sharded first and
then materialised shard by shard, so no rank ever holds it whole.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from train.backends.base import Backend, init_distributed
from train.checkpoint import DCP_DIR, storage_format
from train.checkpoint.full_state import MOMENTS, FullState, read_full_state
from train.checkpoint.safe_unpickle import dcp_load
from train.checkpoint.writing import Writing
from train.optim import build_adamw
from train.parallel.mesh import build_mesh, data_mesh, layout, tp_mesh
from train.parallel.tensor_parallel import apply_tensor_parallel, clip_grads
from train.sharded_init import init_fsdp_shards, is_deferred


def block_precision(bf16: bool) -> dict:
    """Mixed precision of the transformer blocks: bf16 weights for the matmuls, fp32
    gradient reduction, and the inputs left as the caller made them
    (``cast_forward_inputs=False``, as torchtitan does): the rotary tables ``cos``/``sin``
    and the residual stream stay fp32, as under single and DDP, where autocast casts only
    at each matmul. FSDP's default would cast every block's inputs to bf16: rotary angles
    rounded to bf16 and a bf16 residual stream, another model than the one single trains.

    The root (embeddings, final norm, output) gets no policy at all, so its parameters are
    gathered in fp32: the embedding lookup starts the residual stream in fp32 as under single
    (a bf16 table would start it in bf16 whatever the blocks do), and autocast still runs the
    output projection in bf16. The price is the root's one all-gather per step in fp32
    instead of bf16 (it is not resharded after forward, see ``shard_root``)."""
    if not bf16:
        return {}
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                              cast_forward_inputs=False)}


def shard_root(model: torch.nn.Module, mesh, offload: dict) -> None:
    """``fully_shard`` on the root with ``reshard_after_forward`` left unset: torch then
    keeps the root's parameters (the tied embedding/output weight, the final norm)
    unsharded from forward to backward, where the first thing backward needs is the output
    weight; passing True, even the same value as the blocks, would free them after forward
    and gather them again, exposed, at the start of backward (torchtitan and OLMo-core keep
    them too). No ``mp_policy``: the root's parameters stay fp32, see ``block_precision``."""
    fully_shard(model, mesh=mesh, **offload)


class FSDPBackend(Backend):
    name = "fsdp"
    builds_deferred = True

    def model_init_context(self):
        """The meta device: no storage at all until ``fully_shard`` allocates each rank's shard."""
        return torch.device("meta")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layout = layout(cfg, self.world_size)  # a ConfigError before any process group
        init_distributed(self, required=True)  # the device mesh needs a group, even of one process
        self.mesh = None
        self._ckpt_group = None  # background checkpoint writes: made at the first one
        self._stager = None
        self._staging = None  # the save in flight's copy of the state, until it is made
        self._staging_writing = None

    def _mesh(self):
        """The device mesh of ``backend.tp`` and ``backend.hybrid_shard`` (train/parallel/mesh.py)."""
        return build_mesh(self.device.type, self.layout)

    @property
    def data_parallel_size(self) -> int:
        return self.layout.dp

    @property
    def data_parallel_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    def one_per_data_rank(self, values: list) -> list:
        return values[:: self.layout.tp]  # tp innermost: the first rank of each tensor-parallel group

    def _data_groups(self):
        """Under tensor parallelism, the ranks with this rank's tensor-parallel index (one per
        data-parallel rank): made in ``setup``, by every rank."""
        if self.layout.tp == 1:
            return super()._data_groups()
        return self._dp_groups

    def _make_data_groups(self) -> None:
        lay = self.layout
        ranks = [[d * lay.tp + t for d in range(lay.dp)] for t in range(lay.tp)]
        device, _ = dist.new_subgroups_by_enumeration(ranks)
        host = device if dist.get_backend() != "nccl" else dist.new_subgroups_by_enumeration(ranks, backend="gloo")[0]
        self._dp_groups = (host, device)

    def clip_gradients(self, params: list, max_norm: float) -> torch.Tensor:
        if self.layout.tp == 1:
            return super().clip_gradients(params, max_norm)
        return clip_grads(params, max_norm)  # parameters on two meshes: see train/parallel/tensor_parallel.py

    def setup(self, model: torch.nn.Module) -> None:
        bcfg = self.cfg.backend
        mesh = self.mesh = self._mesh()
        if self.layout.tp > 1:
            self._make_data_groups()
        offload = {"offload_policy": CPUOffloadPolicy()} if bcfg.offload_params else {}
        deferred = is_deferred(model)
        if not bcfg.offload_params and not deferred:
            model = model.to(self.device)
        if tp_mesh(mesh) is not None:  # split the blocks' projections first; FSDP then shards each part
            apply_tensor_parallel(model, tp_mesh(mesh))
        shard_mesh = data_mesh(mesh)
        for block in model.layers:
            fully_shard(block, mesh=shard_mesh, reshard_after_forward=bcfg.reshard_after_forward,
                        **block_precision(self.bf16), **offload)
        shard_root(model, shard_mesh, offload)
        if deferred:  # FSDP has allocated nothing yet: each rank makes and initialises its shard
            init_fsdp_shards(model, torch.device("cpu") if bcfg.offload_params else self.device, self.device)
        self.raw_model = self.model = model
        opt_device = torch.device("cpu") if bcfg.offload_params else self.device
        self.optimizer = build_adamw(model, self.cfg.optim, opt_device)

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """Sharded like the trained model, on the same data mesh and precision, but every
        module (the root too) reshards after its forward: there is no backward to keep the
        gathered weights for. (Sharded over the data-parallel ranks only: not split for
        tensor parallelism.)"""
        model = model.requires_grad_(False).eval()
        offload = {"offload_policy": CPUOffloadPolicy()} if self.cfg.backend.offload_params else {}
        if not offload:
            model = model.to(self.device)
        mesh = data_mesh(self.mesh if self.mesh is not None else self._mesh())
        for block in model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=True, **block_precision(self.bf16), **offload)
        fully_shard(model, mesh=mesh, reshard_after_forward=True, **offload)
        return model

    @contextlib.contextmanager
    def micro_step_context(self, is_last: bool):
        """HSDP (``backend.hybrid_shard``): every micro-batch still reduce-scatters within
        the node (so each rank keeps only its shard of the gradient), but the all-reduce
        across replicas waits for the last micro-batch, which sends the sum of all of them
        once; the partial sums meanwhile live in FSDP (the parameters' ``.grad`` is set at
        the last one). Plain FSDP keeps reduce-scattering each micro-batch: skipping that
        (``set_requires_gradient_sync(False)``) would hold every block's unsharded gradient
        until the last one, i.e. the whole model's gradient on each rank."""
        if not self.cfg.backend.hybrid_shard:
            yield
            return
        self.model.set_requires_all_reduce(is_last)
        try:
            yield
        finally:  # a backward outside this context (or after an error) synchronises fully
            self.model.set_requires_all_reduce(True)

    def save(self, directory: str, background: bool = False) -> Writing:
        msd, osd = get_state_dict(self.model, self.optimizer)
        # Tensors only: AdamW's hyperparameters come from the config on load, and a DCP
        # checkpoint without bytes entries is one that loads without unpickling data.
        state = {"model": msd, "optim": {"state": osd["state"]}}
        path = os.path.join(directory, DCP_DIR)
        if not background:
            dcp.save(state, checkpoint_id=path)
            return Writing()
        # DCP copies the shards into host memory from a thread of its own while training goes
        # on (``step`` waits for that copy before the optimizer changes what it reads), then
        # writes them from another thread whose collectives use a group of their own (never
        # the training stream's). Staging in the background is what torchtitan's async mode
        # does: the forward and backward of the next step overlap the copy.
        self.wait_for_staging()
        if self._ckpt_group is None:
            self._ckpt_group = dist.new_group(backend="gloo")
            cuda = self.device.type == "cuda"
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
        response = dcp.async_save(state, checkpoint_id=path, process_group=self._ckpt_group,
                                  async_stager=self._stager)
        self._staging = response.staging_completion
        self._staging_writing = Writing(response.upload_completion)
        return self._staging_writing

    def wait_for_staging(self) -> None:
        """Block until the save in flight has its copy of the parameters and optimizer state:
        before anything changes them (the optimizer step, a load). The wait is training time
        the save took: it is added to the save's ``blocked_s``."""
        if self._staging is not None:
            t0 = time.perf_counter()
            self._staging.result()
            self._staging_writing.blocked_s += time.perf_counter() - t0
            self._staging = self._staging_writing = None

    def step(self, lr: float, max_norm: float):
        self.wait_for_staging()
        return super().step(lr, max_norm)

    def shutdown(self) -> None:
        if self._stager is not None:
            self._stager.close()
        super().shutdown()

    def load(self, directory: str, meta: dict) -> None:
        self.wait_for_staging()
        if storage_format(directory) == "dcp":
            msd, osd = get_state_dict(self.model, self.optimizer)
            if not osd.get("state"):
                self._init_optimizer_state()
                msd, osd = get_state_dict(self.model, self.optimizer)
            # Only tensors are read back: hyperparameters (param_groups) come from the config,
            # so DCP directories written by convert_checkpoint load the same way.
            state = {"model": msd, "optim": {"state": osd["state"]}}
            dcp_load(state, directory)  # only the manifest's files, tensors only
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict={"state": state["optim"]["state"], "param_groups": osd["param_groups"]})
            return
        self.import_full(self.on_main(f"reading {directory}", lambda: read_full_state(directory, self.model)))

    def _init_optimizer_state(self) -> None:
        """Materialise AdamW's state (zeros) so DCP has tensors to load into."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)

    def import_full(self, st: FullState | None, partial: bool = False) -> None:
        """Rank 0's full tensors are broadcast one at a time (DCP's ``broadcast_from_rank0``);
        every rank keeps its shard, so no rank but 0 ever holds a full copy."""
        main = st if self.is_main else None
        set_model_state_dict(self.model, main.model if main else {}, options=StateDictOptions(
            full_state_dict=True, strict=not partial, broadcast_from_rank0=True))
        if self.broadcast_object(bool(main.moments) if main else None):
            self._init_optimizer_state()
            # Full zeros gathered on rank 0 only (cpu_offload), the frame rank 0's moments fill.
            full = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))

            def fill() -> None:
                for name, m in main.moments.items():
                    full["state"][name] = {"step": torch.tensor(float(main.step)),
                                           **{k: m[k].to(torch.float32) for k in MOMENTS}}

            self.on_main("preparing the optimizer state to import", fill)
            set_optimizer_state_dict(self.model, self.optimizer, full if main else {}, options=StateDictOptions(
                full_state_dict=True, broadcast_from_rank0=True))

    def export_full(self, trainable_only: bool = False) -> FullState:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        msd = get_model_state_dict(self.model, options=opts)
        state = get_optimizer_state_dict(self.model, self.optimizer, options=opts).get("state", {})
        keep = {n for n, p in self.model.named_parameters() if p.requires_grad} if trainable_only else None
        moments = {n: {k: s[k] for k in MOMENTS} for n, s in state.items() if keep is None or n in keep}
        steps = [int(s["step"]) for s in state.values()]
        model = msd if keep is None else {n: t for n, t in msd.items() if n in keep}
        return FullState(model=model, moments=moments, step=steps[0] if steps else 0)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
