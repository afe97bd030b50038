"""kiln's portable training state: full (unsharded) weights and AdamW moments by parameter name.

Every backend can export to and import from this form, which is what makes a checkpoint
move between world sizes and between DeepSpeed and FSDP. On disk it is two safetensors
files -- ``model.safetensors`` and ``optimizer.safetensors`` (keys ``<param>.exp_avg`` and
``<param>.exp_avg_sq``, metadata ``step``) -- so loading never unpickles anything.

Native sharded formats are read into it here as well:
- a torch.distributed.checkpoint directory (FSDP) is loaded into full tensors;
- a DeepSpeed ZeRO checkpoint is converted with DeepSpeed's universal-checkpoint tool,
  which writes every parameter's fp32 value and moments unpartitioned.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from train.checkpoint import (  # the layout's owner
    DCP_DIR,
    DS_DIR,
    MODEL_FILE,
    OPTIM_FILE,
    CheckpointError,
    dcp_files,
    deepspeed_tag,
    ds_files,
    listed,
    storage_format,
)
from train.errors import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    model: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {exp_avg, exp_avg_sq}
    step: int = 0

    def save(self, directory: str, model_file: str = MODEL_FILE, optim_file: str = OPTIM_FILE) -> None:
        """Weights into ``model_file``, moments (keys ``<param>.exp_avg``...) and the step
        into ``optim_file``; adapter checkpoints use the adapter file names."""
        save_file(_dedup_tied(self.model), os.path.join(directory, model_file))
        if self.moments:
            flat = {f"{n}.{k}": v.contiguous() for n, m in self.moments.items() for k, v in m.items()}
            save_file(flat, os.path.join(directory, optim_file), metadata={"step": str(self.step)})


def _dedup_tied(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage; store a tied output projection once."""
    out, seen = {}, {}
    for k, v in sd.items():
        v = v.detach().cpu().contiguous()
        key = (v.data_ptr(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    return out


def read_full_state(directory: str, model: torch.nn.Module, with_optimizer: bool = True) -> FullState:
    """Load any kiln checkpoint into a FullState on CPU, shaped for ``model``.

    ``model`` may be plain, FSDP-sharded or DeepSpeed-partitioned: only its parameter names
    and full shapes are used. Tied aliases (output = embedding) get the shared tensor.
    """
    param_names, tied = named_params(model)
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters()}
    fmt = storage_format(directory)
    if fmt == "full":
        st = read_state_files(directory, with_optimizer)
    elif fmt == "dcp":
        st = _read_dcp(directory, param_names, with_optimizer)
    else:
        st = _read_deepspeed(directory, shapes, param_names, with_optimizer)
        st.step = _kiln_step(directory)
    for alias, name in tied.items():  # a tied tensor may have been stored under either name
        if alias not in st.model and name in st.model:
            st.model[alias] = st.model[name]
        elif name not in st.model and alias in st.model:
            st.model[name] = st.model[alias]
    missing = [n for n in param_names if n not in st.model]
    if missing:
        raise KeyError(f"{directory}: checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return st


def read_state_files(directory: str, with_optimizer: bool = True, model_file: str = MODEL_FILE,
                     optim_file: str = OPTIM_FILE) -> FullState:
    """What ``FullState.save`` wrote (full weights, or an adapter checkpoint's files)."""
    files = listed(directory)  # a checkpoint's readers go by its manifest; a weights dir has none
    path = os.path.join(directory, model_file)
    if (files and model_file not in files) or not os.path.isfile(path) or os.path.islink(path):
        raise FileNotFoundError(f"{directory} has no {model_file}")
    st = FullState(model=load_file(path))
    opt = os.path.join(directory, optim_file)
    if with_optimizer and optim_file in files:
        from safetensors import safe_open

        with safe_open(opt, "pt") as f:
            st.step = int(f.metadata().get("step", 0))
            for key in f.keys():
                name, moment = key.rsplit(".", 1)
                if moment in MOMENTS:
                    st.moments.setdefault(name, {})[moment] = f.get_tensor(key)
    return st


def read_adapter_state(directory: str) -> FullState:
    """Adapter (+ head) tensors and their AdamW moments from a LoRA checkpoint."""
    from train.checkpoint import ADAPTER_FILE, ADAPTER_OPTIM_FILE

    if not os.path.isfile(os.path.join(directory, ADAPTER_FILE)):
        raise FileNotFoundError(f"{directory} has no {ADAPTER_FILE} (not a LoRA checkpoint?)")
    return read_state_files(directory, True, ADAPTER_FILE, ADAPTER_OPTIM_FILE)


def _read_dcp(directory: str, param_names: list[str], with_optimizer: bool) -> FullState:
    from train.checkpoint.safe_unpickle import dcp_load, load_dcp_metadata

    meta = load_dcp_metadata(os.path.join(directory, DCP_DIR, ".metadata"), dcp_files(directory))
    shapes = {k: v.size for k, v in meta.state_dict_metadata.items()}
    state: dict = {"model": {}, "optim": {"state": {}}}
    for n in param_names:
        if f"model.{n}" not in shapes:
            raise CheckpointError(f"{directory}: the DCP checkpoint lacks parameter {n}")
        state["model"][n] = torch.empty(shapes[f"model.{n}"], dtype=torch.float32)
        if with_optimizer and f"optim.state.{n}.exp_avg" in shapes:
            state["optim"]["state"][n] = {m: torch.empty(shapes[f"optim.state.{n}.{m}"]) for m in MOMENTS}
            state["optim"]["state"][n]["step"] = torch.zeros(())
    # One process reads the whole directory (rank 0 for a resume, or a tool): no collectives.
    dcp_load(state, directory, no_dist=True)
    moments = {n: {m: s[m] for m in MOMENTS} for n, s in state["optim"]["state"].items()}
    steps = [int(s["step"]) for s in state["optim"]["state"].values()]
    return FullState(model=state["model"], moments=moments, step=steps[0] if steps else 0)


def _kiln_step(directory: str) -> int:
    """AdamW's step count equals kiln's optimizer step (bf16/fp32 never skip a step)."""
    from train.checkpoint import read_trainer_state

    return int(read_trainer_state(directory)["step"])


def _read_deepspeed(directory: str, shapes: dict, param_names: list[str], with_optimizer: bool) -> FullState:
    """DeepSpeed ZeRO 1/2/3 shards -> full tensors, via DeepSpeed's ds_to_universal tool.

    The tool writes one folder per parameter with fp32.pt / exp_avg.pt / exp_avg_sq.pt as
    plain tensors (flattened under ZeRO-3), so they load with weights_only=True."""
    from train.checkpoint.safe_unpickle import check_deepspeed_files

    # ds_to_universal unpickles with weights_only=False: only vetted files reach it, in the
    # tag directory the manifest names (verify refuses any file there it does not list)
    tag = deepspeed_tag(directory)
    check_deepspeed_files(ds_files(directory))
    path = os.path.join(directory, DS_DIR)
    with tempfile.TemporaryDirectory(prefix="kiln-universal-") as out:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(path, tag), "--output_folder", os.path.join(out, "u"), "--num_extract_workers", "1",
               "--num_merge_workers", "1", "--inject_missing_state"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"converting DeepSpeed checkpoint {path} failed:\n{p.stderr[-2000:]}")
        zero = os.path.join(out, "u", "zero")
        st = FullState(model={})
        for n in param_names:
            pdir = os.path.join(zero, n)
            st.model[n] = _load_universal(os.path.join(pdir, "fp32.pt"), shapes[n])
            if with_optimizer and os.path.exists(os.path.join(pdir, "exp_avg.pt")):
                st.moments[n] = {m: _load_universal(os.path.join(pdir, f"{m}.pt"), shapes[n]) for m in MOMENTS}
        return st


def _load_universal(path: str, shape: tuple) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    t = (obj["param"] if isinstance(obj, dict) else obj).detach().float()
    numel = 1
    for d in shape:
        numel *= d
    return t.reshape(-1)[:numel].reshape(shape).clone()


def load_model(path: str, device: str = "cpu", verify: str = "full"):
    """(model in eval mode, step dir) of a kiln checkpoint from any backend; ``path`` as in
    ``train.checkpoint.resolve``, which also verifies it (``verify="off"`` for a directory
    the caller has just verified). Sharded FSDP (DCP) and DeepSpeed ZeRO checkpoints are
    consolidated on the fly."""
    from model.llama import Transformer
    from train.checkpoint import read_model_config, resolve

    step_dir = resolve(path, verify)
    model = Transformer(read_model_config(step_dir))
    state = read_full_state(step_dir, model, with_optimizer=False)
    model.load_state_dict(state.model, strict=True)
    return model.to(device).eval(), step_dir


# ---- starting weights -----------------------------------------------------------------

def load_init_weights(model: torch.nn.Module, path: str) -> None:
    """Start ``model`` from the full weights of a kiln checkpoint -- any backend's format
    (consolidated safetensors, FSDP DCP, DeepSpeed ZeRO shards), given as a step dir,
    checkpoints root or run dir -- or of a local Hugging Face Llama directory given as
    ``hf:<dir>``. Parameters the model has beyond the checkpoint's (a classification head,
    LoRA adapters) keep their initial values; every checkpoint tensor must fit the model."""
    state, source = _read_init(path, model.cfg)
    load_weights(model, state, source)


def read_init_weights(path: str, model_cfg, verify: str = "full") -> dict[str, torch.Tensor]:
    """The full weights ``init_from=path`` names, checked against a Transformer of
    ``model_cfg`` (names and shapes; a mismatch is a ConfigError naming init_from)."""
    state, source = _read_init(path, model_cfg, verify)
    load_weights(shape_model(model_cfg), state, source, assign=True)
    return state


def shape_model(model_cfg):
    """A Transformer on the meta device, for parameter names and shapes only. It leaves the
    global RNG untouched (a model draws its init seed from it): reading a checkpoint on rank 0
    alone must not put rank 0's random stream ahead of the others'."""
    from model.llama import Transformer

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return Transformer(model_cfg, init_weights=False)


def _read_init(path: str, model_cfg, verify: str = "full") -> tuple[dict, str]:
    from model import hf_interop
    from train.checkpoint import resolve
    if path.startswith("hf:"):
        _, state = hf_interop.load_hf_llama(path[3:])
        return state, path
    try:
        step_dir = resolve(path, verify)  # "off": verified by the caller; the structure is checked anyway
    except FileNotFoundError as e:
        raise ConfigError("init_from", str(e)) from None
    # Only names and shapes: read_full_state must not ask for head/adapter tensors.
    return read_full_state(step_dir, shape_model(model_cfg), with_optimizer=False).model, step_dir


def load_weights(model: torch.nn.Module, state: dict, source: str, assign: bool = False) -> None:
    """``state`` into ``model``; parameters the model has beyond it (a head, adapters) keep
    their values, anything else that does not fit is a ConfigError naming init_from."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    except RuntimeError as e:  # a shape mismatch
        raise ConfigError("init_from", f"{source} does not match the model: {e}") from None
    extra = getattr(model, "extra_parameter_names", lambda: set())()
    really_missing = [k for k in missing if k not in extra]
    if really_missing or unexpected:
        raise ConfigError("init_from", f"{source} does not match the model: missing {really_missing[:5]}, "
                          f"unexpected {unexpected[:5]}")


# ---- torch AdamW <-> FullState --------------------------------------------------------

def named_params(model: torch.nn.Module) -> tuple[list[str], dict[str, str]]:
    """Parameter names without tied aliases, and alias -> owner for the tied ones."""
    names, tied, owner = [], {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = id(p)
        if key in owner:
            tied[name] = owner[key]
        else:
            owner[key] = name
            names.append(name)
    return names, tied


def adamw_export(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, int]:
    """Moments by parameter name from a plain (unsharded) torch AdamW."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    moments, step = {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p)
            if s:
                moments[name_of[id(p)]] = {m: s[m].detach().cpu().clone() for m in MOMENTS}
                step = int(s["step"])
    return moments, step


def adamw_import(model: torch.nn.Module, opt: torch.optim.Optimizer, moments: dict, step: int) -> None:
    """Fill a plain torch AdamW's state from moments by name (missing names start fresh)."""
    params = dict(model.named_parameters())
    for name, m in moments.items():
        p = params[name]
        state = opt.state[p]
        state["step"] = adamw_step(opt, p, step)
        for k in MOMENTS:
            state[k] = m[k].to(device=p.device, dtype=p.dtype).clone()


def adamw_step(opt: torch.optim.Optimizer, p: torch.Tensor, step: int) -> torch.Tensor:
    """AdamW's ``step`` state for ``p`` where AdamW wants it: on the parameter's device for
    fused or capturable AdamW (which reject a CPU step on CUDA), else on the CPU."""
    g = opt.param_groups[0]
    on_device = bool(g.get("fused") or g.get("capturable"))
    return torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
