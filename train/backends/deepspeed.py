"""DeepSpeed ZeRO stage 0-3, with optional optimizer / parameter CPU offload.

The DeepSpeed JSON config is generated from the Hydra config (batch sizes, clipping,
precision, ZeRO stage, offload; fp32 gradient reduction and accumulation); a user's own
``backend.ds_config`` file is merged over it, but a value it sets for a key kiln decides
must agree with kiln's, or the run stops naming both keys (``merge_user_config``).
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

from train.backends.base import Backend, uses_bf16
from train.checkpoint import DS_DIR, deepspeed_tag, ds_files, storage_format
from train.checkpoint.full_state import MOMENTS, FullState, adamw_step, named_params, read_full_state
from train.checkpoint.safe_unpickle import check_deepspeed_files
from train.checkpoint.writing import Writing
from train.errors import ConfigError
from train.optim import adamw_kwargs, param_groups
from train.sharded_init import init_zero3_partitions, zero3_dtype


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_ds_config(cfg, bf16: bool) -> dict:
    """DeepSpeed's JSON config for this run, from kiln's keys; a user's ``backend.ds_config``
    merged over it (``merge_user_config``: it may add DeepSpeed knobs, not change kiln's)."""
    b, t, o = cfg.backend, cfg.train, cfg.optim
    stage = int(b.zero_stage)
    zero: dict = {"stage": stage}
    if stage >= 2:
        # Reduce each gradient bucket while backward goes on. DeepSpeed turns this on by
        # itself only for stage 3; without it ZeRO-2 reduces everything after backward.
        zero["overlap_comm"] = True
    if b.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if b.offload_params:
        if stage != 3:
            raise ConfigError("backend.offload_params", "parameter offload needs backend.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    ds = {
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": int(t.grad_accum_steps),
        "gradient_clipping": float(o.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        # Reduce and accumulate gradients in fp32, as FSDP does (reduce_dtype=float32): with
        # bf16 on, DeepSpeed would otherwise do both in bf16 and drift from FSDP as ranks
        # and accumulation steps grow. (ZeRO-1 with bf16 then runs as DeepSpeed's
        # BF16_Optimizer, its stage-1 route for fp32 accumulation.)
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if b.ds_config:
        ds = merge_user_config(ds, cfg, bf16)
    return ds


def kiln_owned(cfg, bf16: bool) -> list[tuple[str, str, object]]:
    """(DeepSpeed key, the kiln key that decides it, kiln's value) for every DeepSpeed
    setting kiln derives from its own config: a user's file may repeat these, never change
    them. Offload is compared as on/off (``offloaded``), so NVMe in place of the CPU agrees."""
    b, t = cfg.backend, cfg.train
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro, accum = int(t.micro_batch_size), int(t.grad_accum_steps)
    return [
        ("train_micro_batch_size_per_gpu", "train.micro_batch_size", micro),
        ("gradient_accumulation_steps", "train.grad_accum_steps", accum),
        ("train_batch_size", f"train.micro_batch_size x train.grad_accum_steps x {world} ranks", micro * accum * world),
        ("gradient_clipping", "optim.grad_clip", float(cfg.optim.grad_clip)),
        ("zero_optimization.stage", "backend.zero_stage", int(b.zero_stage)),
        ("zero_optimization.offload_optimizer.device", "backend.offload_optimizer",
         "cpu" if b.offload_optimizer else "none"),
        ("zero_optimization.offload_param.device", "backend.offload_params", "cpu" if b.offload_params else "none"),
        ("bf16.enabled", "train.precision", bool(bf16)),
        ("fp16.enabled", "train.precision", False),  # kiln trains in bf16 or fp32
    ]


def offloaded(device) -> bool:
    """Whether a DeepSpeed offload ``device`` value moves anything off the accelerator."""
    return device not in (None, "none")


def merge_user_config(ds: dict, cfg, bf16: bool) -> dict:
    """``ds`` with the user's ``backend.ds_config`` file merged over it. A value the file
    sets for a key kiln decides (``kiln_owned``) must agree with kiln's ("auto" takes
    kiln's), and the file may not bring its own optimizer or scheduler: otherwise the run
    would silently train with other settings than the ones kiln prints and checkpoints."""
    path = str(cfg.backend.ds_config)
    user = read_user_config(path)
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError("backend.ds_config", f"{key!r} in {path}: kiln builds the optimizer and schedule "
                              "from optim.*")
    for dotted, kiln_key, want in kiln_owned(cfg, bf16):
        got = lookup(user, dotted)
        if got is None or got == "auto":
            continue
        agrees = offloaded(got) == offloaded(want) if dotted.endswith(".device") else got == want
        if not agrees:
            raise ConfigError("backend.ds_config", f"{dotted}={got!r} in {path} disagrees with kiln's {kiln_key}, "
                              f"which gives {dotted}={want!r}: set it through {kiln_key}, or drop it from the file")
    user.pop("train_batch_size", None)  # agrees (checked above); DeepSpeed derives it from the other two
    return deep_merge(ds, without_auto(user))


def read_user_config(path: str) -> dict:
    try:
        with open(path) as f:
            user = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("backend.ds_config", f"cannot read {path} as JSON: {e}") from None
    if not isinstance(user, dict):
        raise ConfigError("backend.ds_config", f"{path} must hold a JSON object")
    return user


def lookup(d: dict, dotted: str):
    """``d``'s value at the dotted key (``zero_optimization.stage``), None where unset."""
    for name in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(name)
    return d


def without_auto(d: dict) -> dict:
    """The user's file less its "auto" values (Hugging Face's convention for "the trainer
    decides"): kiln's generated values stand there."""
    return {k: without_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}


def planned_bf16(cfg) -> bool:
    """``Backend.bf16`` before the backend exists (config validation): the same decision,
    on the device the backend will pick."""
    on_gpu = cfg.train.device != "cpu" and torch.cuda.is_available()
    return uses_bf16(str(cfg.train.precision), torch.device("cuda" if on_gpu else "cpu"))


def check_start(cfg) -> None:
    """backend=deepspeed before any heavy work (``train.config.validate``): a launcher must
    have started this process, and a user's ``backend.ds_config`` must agree with kiln's
    keys. Raises ConfigError."""
    if "RANK" not in os.environ:
        raise ConfigError("backend.name", "backend=deepspeed joins the process group a launcher describes, and "
                          "this process was started without one (no RANK in the environment): start it with "
                          "`deepspeed --num_gpus N launch/...`, or use backend=single (one process) or "
                          "backend=fsdp")
    build_ds_config(cfg, planned_bf16(cfg))


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, cfg):
        super().__init__(cfg)
        import deepspeed

        self._frozen_engines = []  # frozen_copy's
        choice = cfg.backend.dist_backend
        if choice == "auto":
            choice = "nccl" if self.device.type == "cuda" else "gloo"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        deepspeed.init_distributed(dist_backend=choice, auto_mpi_discovery=False)
        self._is_last = True

    @property
    def compile_outside_hooks(self) -> bool:
        return int(self.cfg.backend.zero_stage) == 3

    @property
    def builds_deferred(self) -> bool:
        return int(self.cfg.backend.zero_stage) == 3

    def model_init_context(self):
        """ZeRO-3: DeepSpeed's ``zero.Init``, which partitions each layer as soon as it is built
        (each rank then fills its own partitions, ``init_zero3_partitions``); else nothing."""
        if not self.builds_deferred:
            return super().model_init_context()
        import deepspeed

        ds = build_ds_config(self.cfg, self.bf16)
        remote = "cpu" if self.cfg.backend.offload_params else None
        # dtype=None: zero.Init takes the parameters' dtype from the config, as the engine
        # does. An explicit dtype goes through DeepSpeed's fallback instead (since 0.14.1,
        # still in 0.19.8), ``dtype or torch.float16 if accelerator.is_fp16_supported() else
        # torch.bfloat16 if ...``, which Python reads as ``(dtype or fp16) if fp16 else bf16``:
        # where fp16 is unsupported (CPUs without AVX512-FP16/AMX-FP16, and every CPU before
        # DeepSpeed 0.16.8) it ignores the dtype asked for and partitions fp32 training in bf16.
        init = deepspeed.zero.Init(config_dict_or_path=ds, remote_device=remote, dtype=None)
        want = zero3_dtype(ds)
        if getattr(init, "dtype", want) != want:
            raise RuntimeError(f"DeepSpeed's zero.Init would build the parameters in {init.dtype}, not the "
                               f"{want} this run trains in")
        return init

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
        if self.compile_outside_hooks and self.cfg.train.compile:
            from deepspeed.utils import set_z3_leaf_modules

            # One gathering hook per block, outside its compiled forward (train/compile.py).
            set_z3_leaf_modules(model, [type(block) for block in model.layers])
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        self.engine = engine
        self.model = engine
        self.raw_model = engine.module
        self.optimizer = optimizer

    def frozen_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """ZeRO-3: partitioned by an engine of its own with no optimizer (DeepSpeed's ZeRO-3
        inference: each forward gathers a layer's parameters and frees them after it), in the
        trained engine's precision; other stages hold it whole."""
        if int(self.cfg.backend.zero_stage) != 3:
            return super().frozen_copy(model)
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model.requires_grad_(False).eval(), config=self.ds_config)
        self._frozen_engines.append(engine)  # its hooks' owner lives as long as the backend
        return engine.module.eval()

    def zero3_offload(self, module: torch.nn.Module):
        """The trained engine's (its ZeRO-3 optimizer's ``parameter_offload``) or a frozen
        copy's engine's (no optimizer: the offload is the engine's optimizer)."""
        if int(self.cfg.backend.zero_stage) != 3:
            return None
        if module is self.raw_model:
            return self.engine.optimizer.parameter_offload
        for engine in self._frozen_engines:
            if module is engine.module:
                return engine.optimizer
        raise ValueError("the module is not one of this backend's ZeRO-3 engines")

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

    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        """The pre-clip global gradient norm as a tensor, left where DeepSpeed computed it:
        the trainer reads it at logging steps only (a read syncs the GPU). DeepSpeed hands
        a Python float only when it has no tensor (before any step, an overflow, norms off)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            return norm.detach().clone()  # DeepSpeed may reuse its buffer by the time it is read
        return torch.tensor(float("nan") if norm is None else norm)

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
