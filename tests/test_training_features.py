import json

import pytest
import torch

from model.llama import ModelConfig, Transformer
from tests.conftest import REPO, compose
from train.activation_checkpointing import apply_activation_checkpointing
from train.backends.deepspeed import build_ds_config
from train.compile import compile_blocks
from train.optim import lr_at


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32))


def loss_and_grads(model, x):
    model.zero_grad()
    _, loss = model(x, x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    x = torch.randint(0, 97, (2, 16))
    ref_loss, ref_grads = loss_and_grads(tiny_model(), x)
    m = tiny_model()
    apply_activation_checkpointing(m)
    loss, grads = loss_and_grads(m, x)
    assert torch.equal(loss, ref_loss)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-7) for n in ref_grads)
    assert set(m.state_dict()) == set(tiny_model().state_dict())  # checkpoints unchanged


def test_compiled_blocks_match_eager_and_keep_parameter_names():
    x = torch.randint(0, 97, (2, 16))
    ref_loss, ref_grads = loss_and_grads(tiny_model(), x)
    m = tiny_model()
    compile_blocks(m)
    loss, grads = loss_and_grads(m, x)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5) for n in ref_grads)
    assert set(m.state_dict()) == set(tiny_model().state_dict())
    m.cfg.loss_chunk = 12  # 32 positions: the compiled loss now takes its chunked, recomputing path
    loss, grads = loss_and_grads(m, x)
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert all(torch.allclose(grads[n], ref_grads[n], atol=1e-5) for n in ref_grads)


def test_deepspeed_config_is_generated_from_hydra_and_user_file_merges(tmp_path):
    cfg = compose(["backend=deepspeed", "backend.zero_stage=3", "train.micro_batch_size=3",
                   "train.grad_accum_steps=5", "optim.grad_clip=0.5"])
    ds = build_ds_config(cfg, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 3
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "train_micro_batch_size_per_gpu": 3}))
    cfg.backend.ds_config = str(user)
    merged = build_ds_config(cfg, bf16=False)
    assert merged["zero_optimization"] == {**ds["zero_optimization"], "reduce_bucket_size": 123}
    user.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    with pytest.raises(ValueError, match="backend.ds_config: gradient_accumulation_steps=2"):
        build_ds_config(cfg, bf16=False)
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="backend.ds_config: 'optimizer'"):
        build_ds_config(cfg, bf16=False)


def test_parameter_offload_without_zero3_is_rejected_naming_the_key():
    cfg = compose(["backend=deepspeed", "backend.zero_stage=2", "backend.offload_params=true"])
    with pytest.raises(ValueError, match="backend.offload_params"):
        build_ds_config(cfg, bf16=False)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_warm_up_linearly_then_follow_their_shape(schedule):
    cfg = compose([f"optim.schedule={schedule}", "optim.lr=1.0", "optim.min_lr_ratio=0.1",
                   "optim.warmup_steps=10", "optim.decay_fraction=0.2"]).optim
    lrs = [lr_at(s, cfg, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    if schedule == "cosine":
        assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
        assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    elif schedule == "wsd":
        assert all(v == 1.0 for v in lrs[10:80]) and lrs[-1] == pytest.approx(0.1)
        assert lrs[85] < 1.0
    else:
        assert all(v == 1.0 for v in lrs[10:])


def test_mfu_peak_matches_the_exact_device_variant():
    from train.metrics import peak_tflops_for

    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H200") == 989.4
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("NVIDIA L4") == 121.0 and peak_tflops_for("NVIDIA L40S") == 362.1
    assert peak_tflops_for("NVIDIA L40") == 181.0
    assert peak_tflops_for("NVIDIA A10G") == 70.0 and peak_tflops_for("NVIDIA A10") == 125.0
    assert peak_tflops_for("Tesla V100-SXM2-32GB") is None  # no bf16 tensor cores


def test_no_float_tensor_is_read_back_between_logging_steps(tiny_cfg):
    """On a GPU, reading a loss or a norm to the host waits for the device. Between logging
    steps kiln's code must read none: here every host read of a floating-point tensor made
    by kiln's own code is recorded with the step the trainer was at. (torch's CPU AdamW reads
    its step counter; on GPUs kiln uses fused AdamW, which keeps it on the device.)"""
    import sys

    from torch.overrides import TorchFunctionMode

    from train.trainer import Trainer

    reads = []

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in ("item", "tolist", "__float__", "__int__", "__bool__") and args \
                    and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(REPO) and "/tests/" not in caller:
                    reads.append((trainer.state.step, name, caller))
            return func(*args, **(kwargs or {}))

    trainer = Trainer(tiny_cfg("train.max_steps=10", "train.log_every=5", "train.eval_every=10",
                                "checkpoint.every=10"))
    with HostReads():
        result = trainer.fit()
    assert result["final_step"] == 10 and sorted(result["losses"]) == list(range(1, 11))
    between = [r for r in reads if r[0] in (1, 2, 3, 4, 6, 7, 8, 9)]
    assert not between, between
    assert any(r[0] == 5 for r in reads)  # the logging step does read them


def _metrics(path, train, evals=()):
    with open(path, "w") as f:
        for s, v in train:
            f.write(json.dumps({"step": s, "kind": "train", "loss": v}) + "\n")
        for s, v in evals:
            f.write(json.dumps({"step": s, "kind": "eval", "val_loss": v}) + "\n")
    return str(path)


def test_plots_show_a_lone_point_and_put_classification_loss_on_its_own_axis(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from train.metrics import plot_losses, plot_runs

    figs = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), real_savefig(self, *a, **k)))
    assert plot_losses(_metrics(tmp_path / "one.jsonl", [(1, 6.9)]), str(tmp_path / "one.png"))
    (line,) = figs[-1].axes[0].get_lines()
    assert line.get_marker() == "o" and len(line.get_xdata()) == 1  # visible, not an empty line

    pre = _metrics(tmp_path / "pre.jsonl", [(s, 7.0 - s / 100) for s in range(1, 101)], [(100, 6.1)])
    cls = _metrics(tmp_path / "cls.jsonl", [(s, 0.7 - s / 1000) for s in range(1, 61)], [(60, 0.6)])
    assert plot_runs([("pretraining", pre), ("classification", cls, "example")], str(tmp_path / "runs.png"))
    left, right = figs[-1].axes
    assert left.get_ylabel() == "language-model loss (nats/token)"
    assert right.get_ylabel() == "classification loss (nats/example)"
    curves = [ln for ln in left.get_lines() if "loss" in ln.get_label()]  # not the run separators
    assert max(max(ln.get_ydata()) for ln in right.get_lines()) < 1 < min(min(ln.get_ydata()) for ln in curves)
    assert min(right.get_lines()[0].get_xdata()) == 101  # laid after the pretraining run
