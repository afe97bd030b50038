"""DeepSpeed ZeRO stage 0-3, with optional optimizer / parameter CPU offload.

The DeepSpeed JSON config is generated from the Hydra config (batch sizes, clipping,
precision, ZeRO stage, offload); a user's own ``backend.ds_config`` file is merged over
it, except for the batch keys, which must agree with kiln's or the run stops naming them.
kiln keeps control of the learning rate (written into the param groups each step) and of
gradient accumulation (DeepSpeed's micro-step counter is advanced per micro-batch, the
loss arrives already scaled).

Checkpoints are DeepSpeed's own (``deepspeed/`` inside the kiln checkpoint). Resuming with
the same world size and ZeRO stage uses DeepSpeed's loader; anything else (another world
size, another stage, an FSDP or single-device checkpoint) goes through the portable full
state and DeepSpeed's public full-parameter setters: rank 0 reads it (one conversion, not
one per rank) and streams it to the others a tensor at a time. Under ZeRO-3 the model is
built inside ``zero.Init`` (``train/sharded_init.py``) and each rank initialises its own
partitions, so no rank holds the whole model at launch.
"""

from __future__ import annotations

import json
import os

import torch

from train.backends.base import Backend, Writing
from train.checkpoint import DS_DIR, deepspeed_tag, ds_files, storage_format
from train.checkpoint.full_state import MOMENTS, FullState, adamw_step, named_params, read_full_state
from train.checkpoint.safe_unpickle import check_deepspeed_files
from train.config import ConfigError
from train.optim import adamw_kwargs, param_groups
from train.sharded_init import init_zero3_partitions


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg, bf16: bool) -> dict:
    b, t, o = cfg.backend, cfg.train, cfg.optim
    zero: dict = {"stage": int(b.zero_stage)}
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if b.offload_params:
        if b.zero_stage != 3:
            raise ValueError("config error: backend.offload_params: parameter offload needs backend.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if b.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(t.grad_accum_steps),
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if b.ds_config:
        with open(b.ds_config) as f:
            user = json.load(f)
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
            if key in user and key != "train_batch_size" and user[key] != ds[key]:
                raise ValueError(f"config error: backend.ds_config: {key}={user[key]} in {b.ds_config} "
                                 f"disagrees with kiln's {ds[key]} (set it through train.*)")
        user.pop("train_batch_size", None)
        for key in ("optimizer", "scheduler"):
            if key in user:
                raise ValueError(f"config error: backend.ds_config: {key!r} in {b.ds_config}: kiln builds the "
                                 "optimizer and schedule from optim.*")
        ds = deep_merge(ds, user)
    return ds


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg):
        super().__init__(cfg)
        import deepspeed

        choice = cfg.backend.dist_backend
        if choice == "auto":
            choice = "nccl" if self.device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        deepspeed.init_distributed(dist_backend=choice, auto_mpi_discovery=False)
        self._is_last = True

    def setup(self, model: torch.nn.Module) -> None:
        import deepspeed

        if self.bf16 and int(self.cfg.backend.zero_stage) == 0:
            raise ConfigError("backend.zero_stage", "DeepSpeed stage 0 with bf16 keeps no fp32 master weights or "
                              "moments where kiln's checkpoints can read them back; use backend.zero_stage=1 (same "
                              "memory as DDP plus sharded optimizer state) or backend=ddp")
        self.ds_config = build_ds_config(self.cfg, self.bf16)
        o = self.cfg.optim
        if self.cfg.backend.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                   eps=o.eps, adamw_mode=True)
        else:
            opt = torch.optim.AdamW(param_groups(model, o.weight_decay), **adamw_kwargs(o, self.device))
        if any(hasattr(p, "ds_tensor") for p in model.parameters()):  # built under zero.Init
            init_zero3_partitions(model)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        self.engine = engine
        self.model = engine
        self.raw_model = engine.module
        self.optimizer = optimizer

    def shutdown(self) -> None:
        """Leave the group, then remove this rank's shared-memory segment of DeepSpeed's CPU
        all-reduce (/dev/shm/deepspeed_allreduce_buffer_*: 66 MB a rank). DeepSpeed never
        unlinks it, so every CPU run would leave it behind until the machine reboots; after
        the barrier every rank has mapped the others', and a mapping outlives its name."""
        super().shutdown()
        if self.device.type == "cpu":
            import glob

            port = os.environ.get("MASTER_PORT", "")
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{self.rank}"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def micro_step_context(self, is_last: bool):
        self._is_last = is_last
        return super().micro_step_context(is_last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self._is_last:
            self.engine.step()  # advances DeepSpeed's micro-step counter; no update

    def step(self, lr: float, max_norm: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, directory: str, background: bool = False) -> Writing:
        """DeepSpeed writes its files synchronously (its asynchronous engines need NVMe
        libaio or Nebula); with ``background`` kiln still hashes and commits them in the
        background."""
        self.engine.save_checkpoint(os.path.join(directory, DS_DIR), tag="ckpt", save_latest=True)
        return Writing()

    def load(self, directory: str, meta: dict) -> None:
        native = (storage_format(directory) == "deepspeed" and meta.get("world_size") == self.world_size
                  and meta.get("zero_stage") == int(self.cfg.backend.zero_stage))
        if native:
            tag = deepspeed_tag(directory)  # the manifest's tag, never DeepSpeed's pointer file
            check_deepspeed_files(ds_files(directory))  # DeepSpeed unpickles with weights_only=False
            path, _ = self.engine.load_checkpoint(os.path.join(directory, DS_DIR), tag=tag,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {directory}")
            return
        self.import_full(self.on_main(f"reading {directory}", lambda: read_full_state(directory, self.raw_model)))

    def import_full(self, st: FullState | None, partial: bool = False) -> None:
        """Set weights and moments from rank 0's full tensors, streamed a tensor at a time;
        ``partial``: only the names in ``st`` (adapter checkpoints)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        stage = int(self.cfg.backend.zero_stage)
        main = st if self.is_main else None
        names, _ = named_params(self.raw_model)
        def flatten() -> dict:
            flat = {("model", n): main.model[n] for n in names if n in main.model}
            flat.update({(k, n): main.moments[n][k] for n in names if n in main.moments for k in MOMENTS})
            return flat

        flat = self.on_main("preparing the state to import", flatten)
        step, has_moments = self.broadcast_object((main.step, bool(main.moments)) if main else None)
        if has_moments and stage > 0:
            self._materialize_optimizer_state()
        params = dict(self.raw_model.named_parameters())
        for (kind, name), full in self.stream_from_main(flat):
            p = params[name]
            full = full.to(torch.float32)
            if stage == 0:
                with torch.no_grad():
                    if kind == "model":
                        p.copy_(full.to(p.device, p.dtype))
                    else:
                        state = self.optimizer.state[p]
                        state[kind] = full.to(p.device).clone()
                        state.setdefault("step", adamw_step(self.optimizer, p, step))
            elif kind == "model":
                safe_set_full_fp32_param(p, full.to(self.device))
            else:
                safe_set_full_optimizer_state(p, full.to(self.device), kind)
        if stage > 0:
            self._copy_master_to_model_weights()
        self._set_step(step)

    def _materialize_optimizer_state(self) -> None:
        """AdamW creates its moments lazily at the first step, and DeepSpeed links each
        parameter to its slice of them only then; create them (zeros) on the flat fp32
        partitions (ZeRO-3: ``fp32_partitioned_groups_flat``; ZeRO-1/2: the inner
        optimizer's params) and link them now, so the full-state setters have a target."""
        opt = self.optimizer
        inner = opt.optimizer
        flats = getattr(opt, "fp32_partitioned_groups_flat", None)
        if flats is None:
            flats = [p for group in inner.param_groups for p in group["params"]]
        for p in flats:
            s = inner.state[p]
            if not s:
                s["step"] = adamw_step(inner, p, 0)
                s["exp_avg"] = torch.zeros_like(p)
                s["exp_avg_sq"] = torch.zeros_like(p)
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _copy_master_to_model_weights(self) -> None:
        """The setters write DeepSpeed's fp32 master copy; the weights the model computes
        with are a separate (possibly bf16) copy that DeepSpeed refreshes only after a step."""
        opt = self.optimizer
        if hasattr(opt, "fp16_partitioned_groups_flat"):  # ZeRO-3
            for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
                if lp is not None:
                    lp.data.copy_(hp.data)
        elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2 and the bf16 optimizer
            opt.update_lp_params()

    def _set_step(self, step: int) -> None:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for s in inner.state.values():
            if "step" in s:
                old = s["step"]
                s["step"] = torch.tensor(float(step), dtype=old.dtype, device=old.device) \
                    if isinstance(old, torch.Tensor) else step

    def export_full(self, trainable_only: bool = False) -> FullState:
        """Trained parameters are gathered from their ZeRO partitions (collective), so an
        adapter checkpoint is never empty under ZeRO-3."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        names, _ = named_params(self.raw_model)
        if trainable_only:
            names = [n for n in names if dict(self.raw_model.named_parameters())[n].requires_grad]
        stage = int(self.cfg.backend.zero_stage)
        params = dict(self.raw_model.named_parameters())
        model, moments, step = {}, {}, 0
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        # Before the first step AdamW has no moments to gather; gathering is collective, so all agree.
        stepped = any(self.all_gather_object(any(inner.state.values())))
        for n in names:
            p = params[n]
            if stage == 0:
                model[n] = p.detach().float().cpu().clone()
                s = self.optimizer.state.get(p, {})
                if s:
                    moments[n] = {k: s[k].float().cpu().clone() for k in MOMENTS}
            else:
                model[n] = safe_get_full_fp32_param(p).cpu()
                got = {k: safe_get_full_optimizer_state(p, k) for k in MOMENTS} if stepped else {}
                if got and all(v is not None for v in got.values()):
                    moments[n] = {k: v.cpu() for k, v in got.items()}
        for group in inner.param_groups:
            for p in group["params"]:
                if "step" in inner.state.get(p, {}):
                    step = int(inner.state[p]["step"])
        return FullState(model=model, moments=moments, step=step)
