"""How kiln sets up FSDP2 and DDP, checked on real torch.distributed (gloo, one process).

One subprocess (this file run as ``python -m tests.test_fsdp_ddp_settings OUT``) builds a
tiny model under single, FSDP, HSDP and DDP, with the backends as kiln configures them,
and writes what it observed; the tests below read it. One process is enough: FSDP2 and DDP
run the same hooks, casts, reshards and bucket logic at world size 1, and a subprocess
keeps the process group out of the pytest process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY

SEQ, BATCH, VOCAB = 16, 2, 128


# -- the probe (runs in the subprocess) -------------------------------------------------------
def build_model():
    """The same tiny tied-embedding model every time (seeded)."""
    import torch

    from model.llama import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   max_seq_len=32, tie_embeddings=True))


def micro_batches(n: int) -> list:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(n)]


def make_backend(*overrides):
    from tests.conftest import compose
    from train.backends import build_backend

    return build_backend(compose(TINY + ["train.device=cpu", *overrides]))


def autocast(backend):
    """What the trainer wraps every forward in (Trainer.autocast)."""
    import contextlib

    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if backend.bf16 else contextlib.nullcontext()


def record_block_inputs(model) -> list:
    """Dtypes of (residual, cos, sin) as each block receives them. FSDP's own pre-forward
    hook is prepended, so this one sees the inputs after any cast FSDP makes."""
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda _m, args: seen.append([str(t.dtype) for t in args[:3]]))
    return seen


def groups(module):
    return module._get_fsdp_state()._fsdp_param_groups


def bf16_forward(*overrides) -> dict:
    """One bf16 forward+backward: block input dtypes, the loss, and (FSDP) the root's and
    the blocks' sharding around the forward."""
    b = make_backend("train.precision=bf16", *overrides)
    b.setup(build_model())
    seen = record_block_inputs(b.raw_model)
    (x,) = micro_batches(1)
    with autocast(b):
        _, loss = b.model(x, x)
    out = {"bf16": b.bf16, "block_inputs": seen, "loss": float(loss.detach())}
    if b.name == "fsdp":
        layers = b.raw_model.layers
        out["root_reshard_after_forward"] = [g.post_forward_mesh_info is not None for g in groups(b.raw_model)]
        out["blocks_reshard_after_forward"] = [g.post_forward_mesh_info is not None
                                               for blk in layers for g in groups(blk)]
        out["root_unsharded_after_forward"] = [g.is_unsharded for g in groups(b.raw_model)]
        out["blocks_unsharded_after_forward"] = [g.is_unsharded for blk in layers for g in groups(blk)]
    b.backward(loss)
    return out


def grads(model) -> dict:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def accumulate(b, xs) -> dict:
    """Forward+backward of each micro-batch the way Trainer.forward_backward does; returns the
    all-reduce flags of every FSDP group inside each micro-step and whether any gradient was
    set after the first one."""
    flags, set_after_first = [], None
    for i, x in enumerate(xs):
        last = i == len(xs) - 1
        with b.micro_step_context(last):
            flags.append([g.all_reduce_grads for m in b.raw_model.modules() if hasattr(m, "_get_fsdp_state")
                          for g in groups(m)] if b.name == "fsdp" else [])
            _, loss = b.model(x, x)
            b.backward(loss / len(xs))
        if i == 0:
            set_after_first = any(p.grad is not None for p in b.raw_model.parameters())
    return {"flags": flags, "set_after_first": set_after_first}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def hsdp_accumulation() -> dict:
    """Two micro-batches under HSDP (a 1x1 replicate x shard mesh) against single's grads."""
    xs = micro_batches(2)
    ref = make_backend("backend=single", "train.precision=fp32")
    ref.setup(build_model())
    accumulate(ref, xs)
    b = make_backend("backend=fsdp", "backend.hybrid_shard=true", "train.precision=fp32")
    b.setup(build_model())
    seen = accumulate(b, xs)
    after = [g.all_reduce_grads for m in b.raw_model.modules() if hasattr(m, "_get_fsdp_state") for g in groups(m)]
    return {**seen, "flags_after": after, "max_grad_diff": max_diff(grads(b.raw_model), grads(ref.raw_model)),
            "grad_scale": max(float(g.abs().max()) for g in grads(ref.raw_model).values())}


def train_two_steps(b, wrap) -> dict:
    """Two optimizer steps of two micro-batches, clipping on (max_norm far below the norm);
    after each step's last backward, how many distinct storages hold the gradients."""
    b.setup(build_model())
    if wrap:  # DDPBackend wraps only at world size > 1: wrap as it would, in this one-process group
        from train.backends.ddp import wrap_ddp

        b.model = wrap_ddp(b.raw_model, b.device)
    storages, norms = [], []
    for step in range(2):
        accumulate(b, micro_batches(2 + step)[step:])
        storages.append(len({p.grad.untyped_storage().data_ptr() for p in b.raw_model.parameters()}))
        norms.append(float(b.step(1e-2, max_norm=0.01)))
    out = {"grad_storages": storages, "norms": norms, "params": len(list(b.raw_model.parameters())),
           "weights": {n: p.detach().clone() for n, p in b.raw_model.named_parameters()}}
    if wrap:
        out["syncs_buffers_in_forward"] = b.model.will_sync_module_buffers()
        out["buffers"] = len(list(b.raw_model.buffers()))
    return out


def ddp_training() -> dict:
    ref = train_two_steps(make_backend("backend=single", "train.precision=fp32"), wrap=False)
    got = train_two_steps(make_backend("backend=ddp", "train.precision=fp32"), wrap=True)
    return {"single_grad_storages": ref["grad_storages"], "ddp_grad_storages": got["grad_storages"],
            "params": got["params"], "norms": [ref["norms"], got["norms"]], "buffers": got["buffers"],
            "syncs_buffers_in_forward": got["syncs_buffers_in_forward"],
            "max_weight_diff": max_diff(got["weights"], ref["weights"])}


def weights(model) -> dict:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def fsdp_async_save(directory: str) -> dict:
    """An asynchronous save, then at once an optimizer step that changes every weight while
    the save is in flight: what the checkpoint holds, loaded into a fresh FSDP model."""
    from train import checkpoint as ckpt

    b = make_backend("backend=fsdp", "train.precision=fp32")
    b.setup(build_model())
    (x,) = micro_batches(1)
    for i in range(2):  # the second step's gradients are left for the step during the save
        _, loss = b.model(x, x)
        b.backward(loss)
        if i == 0:
            b.step(1e-2, max_norm=1.0)
    before = weights(b.raw_model)
    writing = b.save(directory, background=True)
    b.step(0.5, max_norm=0.0)  # a large step: every weight moves
    moved = max_diff(weights(b.raw_model), before)
    writing.wait()
    ckpt.seal(directory, {"step": 1})
    fresh = make_backend("backend=fsdp", "train.precision=fp32")
    fresh.setup(build_model())
    fresh.load(directory, ckpt.read_meta(directory))
    return {"moved_by_the_step": moved, "saved_minus_before": max_diff(weights(fresh.raw_model), before)}


def probe(out_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    result = {"single_bf16": bf16_forward("backend=single"), "fsdp_bf16": bf16_forward("backend=fsdp")}
    result["hsdp"] = hsdp_accumulation()
    result["ddp"] = ddp_training()
    result["fsdp_async"] = fsdp_async_save(os.path.join(os.path.dirname(out_path), "async_save"))
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


# -- the tests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp_ddp") / "probe.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                            "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "tests.test_fsdp_ddp_settings", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_cpu_bf16_precision_is_on_for_both_runs(seen):
    assert seen["single_bf16"]["bf16"] and seen["fsdp_bf16"]["bf16"]


def test_fsdp_blocks_receive_fp32_rotary_tables_and_residual_as_under_single(seen):
    fp32 = [["torch.float32"] * 3] * 2
    assert seen["single_bf16"]["block_inputs"] == fp32
    assert seen["fsdp_bf16"]["block_inputs"] == fp32


def test_fsdp_bf16_loss_equals_single(seen):
    # Same weights, same casts: bf16 block weights under FSDP are what autocast makes of
    # single's fp32 ones, and the root (embedding, norm, output) computes as single does.
    assert seen["fsdp_bf16"]["loss"] == pytest.approx(seen["single_bf16"]["loss"], abs=1e-5)


def test_fsdp_root_keeps_its_parameters_unsharded_after_forward_and_blocks_reshard(seen):
    got = seen["fsdp_bf16"]
    assert got["root_reshard_after_forward"] == [False]
    assert got["root_unsharded_after_forward"] == [True]
    assert got["blocks_reshard_after_forward"] == [True, True]  # backend.reshard_after_forward=true
    assert got["blocks_unsharded_after_forward"] == [False, False]


def test_hsdp_all_reduces_across_replicas_only_on_the_last_micro_batch(seen):
    got = seen["hsdp"]
    groups = len(got["flags_after"])
    assert groups == 3  # the root and two blocks
    assert got["flags"] == [[False] * groups, [True] * groups]
    assert got["flags_after"] == [True] * groups  # a backward outside a micro-step syncs fully
    assert got["set_after_first"] is False  # the first micro-batch's sum waits inside FSDP


def test_hsdp_accumulated_gradients_equal_single(seen):
    got = seen["hsdp"]
    assert got["grad_scale"] > 1e-3
    assert got["max_grad_diff"] <= 1e-6 * got["grad_scale"], got


def test_ddp_does_not_broadcast_buffers_every_forward(seen):
    assert seen["ddp"]["buffers"] == 2  # the rotary tables: there are buffers it could broadcast
    assert seen["ddp"]["syncs_buffers_in_forward"] is False


def test_ddp_gradients_are_views_of_one_bucket_on_every_step(seen):
    got = seen["ddp"]
    assert got["single_grad_storages"] == [got["params"]] * 2  # separate tensors without DDP
    # The tiny model fits DDP's first (1 MiB) bucket: all gradients share its storage, also
    # on the second step, after the optimizer set them to None.
    assert got["ddp_grad_storages"] == [1, 1]


def test_ddp_with_bucket_views_clips_accumulates_and_steps_exactly_as_single(seen):
    got = seen["ddp"]
    single, ddp = got["norms"]
    assert min(single) > 0.01  # clipping was active on both steps
    assert ddp == single
    assert got["max_weight_diff"] == 0.0


def test_fsdp_async_save_holds_the_weights_of_its_step_though_the_next_step_runs_during_it(seen):
    """The host copy is made in the background (DCP async staging); the optimizer step
    waits for it, so the checkpoint never holds weights half-updated by the next step."""
    got = seen["fsdp_async"]
    assert got["moved_by_the_step"] > 1e-3
    assert got["saved_minus_before"] == 0.0


if __name__ == "__main__":
    probe(sys.argv[1])
