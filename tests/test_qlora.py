"""QLoRA for real, on the CPU: NF4 + double-quantized base weights through bitsandbytes.

- the LoRA-targeted weights are held as packed 4-bit NF4 with nested (double-quantized)
  scales, the rest untouched, and the model's weight memory shrinks accordingly;
- a QLoRA fine-tune gives exactly the losses of plain LoRA on the dequantized base (on the CPU
  bitsandbytes dequantizes and runs the same fp32 matmul), checkpoints the adapter alone and
  resumes exactly;
- merging dequantizes: the merged kiln checkpoint and its HF export give the QLoRA model's
  logits (1e-5 and 1e-4);
- 2-process DDP QLoRA gives the single-process losses;
- FSDP and DeepSpeed are refused with a ConfigError naming lora.quantize and why.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from model.llama import ModelConfig, Transformer
from model.lora import add_lora, lora_modules, quantize_base_4bit
from model.quant import dequantize, is_quantized, weight_memory
from tests.ckpt_helpers import reseal
from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
from train.config import ConfigError

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
QLORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "lora.quantize=4bit"]
STEPS = ["train.max_steps=4", "checkpoint.every=2"]


def test_targeted_weights_are_held_as_nf4_with_double_quantized_scales():
    torch.manual_seed(0)
    model = Transformer(CFG)
    add_lora(model, "default", rank=4, alpha=8, targets=["wq", "wv", "w2"])
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = weight_memory(model)
    assert quantize_base_4bit(model) == 2 * 3
    for name, p in model.named_parameters():
        if name.endswith((".wq.weight", ".wv.weight", ".w2.weight")):
            w = dense[name]
            assert is_quantized(p) and p.dtype == torch.uint8 and p.numel() * 2 == w.numel()  # two codes a byte
            qs = p.quant_state
            assert qs.quant_type == "nf4" and qs.nested and qs.absmax.dtype == torch.uint8  # scales quantized again
            back = dequantize(p)
            assert back.shape == w.shape and back.dtype == w.dtype
            err = float((back - w).norm() / w.norm())
            assert 0.01 < err < 0.15, err  # really rounded to 16 levels, and close
        else:
            assert not is_quantized(p) and torch.equal(p, dense[name]), name
    after = weight_memory(model)
    # Per weight of n values: 4 bits a value, one 8-bit scale per 64 values, one fp32 scale per
    # 256 of those, a 16-entry NF4 code book and a 256-entry 8-bit one (fp32), against 32 bits a value.
    sizes = [dense[n].numel() for n in dense if n.endswith((".wq.weight", ".wv.weight", ".w2.weight"))]
    nf4 = sum(n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 4 * 16 + 4 * 256 for n in sizes)
    assert before["held"] - after["held"] == 4 * sum(sizes) - nf4
    assert after["fp32"] == before["fp32"] and after["bf16"] == before["fp32"] // 2


@pytest.fixture(scope="module")
def qruns(tmp_path_factory, tokenizer_path):
    """A QLoRA run straight to step 4, the same run stopped at step 2 and resumed, and plain
    LoRA from a base whose targeted weights are the dequantized NF4 ones."""
    from train.checkpoint.full_state import FullState
    from train.sft.adapters import load_base
    from train.sft.trainer import SFTTrainer

    root = tmp_path_factory.mktemp("qlora")
    base = tiny_checkpoint(tmp_path_factory, tokenizer_path)
    data = chat_file(root, 24)

    def run(name, init, *extra):
        tr = SFTTrainer(sft_cfg(root / name, init, [data], *extra))
        return tr, tr.fit()

    straight_tr, straight = run("straight", base, *QLORA, *STEPS)
    _, first = run("resumed", base, *QLORA, *STEPS, "train.stop_at_step=2")
    _, second = run("resumed", base, *QLORA, *STEPS)

    # The base checkpoint with its targeted weights replaced by their dequantized NF4 values.
    model = load_base(str(root / "straight" / "checkpoints" / "step_00000002"))
    add_lora(model, "x", 1, 1.0)
    quantize_base_4bit(model)
    state = {n: t for n, t in model.state_dict().items() if ".lora_" not in n}
    for mod_name, mod in model.named_modules():
        if mod in lora_modules(model):
            state[f"{mod_name}.weight"] = mod.dense_weight().clone()
    deq_dir = root / "dequantized"
    shutil.copytree(os.path.join(base, "checkpoints", "step_00000002"), deq_dir)
    FullState(model=state).save(str(deq_dir))
    reseal(deq_dir)
    _, lora = run("lora", str(deq_dir), *QLORA[:-1], *STEPS)
    return {"root": root, "straight": straight, "first": first, "second": second, "lora": lora,
            "trainer": straight_tr, "base": base}


def test_qlora_losses_match_lora_on_the_dequantized_base(qruns):
    """Exact equality, not a tolerance: LoRA on the un-rounded base is only 9.6e-5 (relative)
    away at step 1, so even 1e-4 would let a QLoRA run that trained on the wrong base pass."""
    q, lo = qruns["straight"]["losses"], qruns["lora"]["losses"]
    assert sorted(q) == sorted(lo) == [1, 2, 3, 4]
    assert q == lo
    assert q[4] < q[1]  # and it learns


def test_qlora_checkpoint_holds_the_adapter_only_and_records_the_quantization(qruns):
    from safetensors.torch import load_file

    step = qruns["root"] / "straight" / "checkpoints" / "step_00000004"
    files = set(os.listdir(step))
    assert {"adapter.safetensors", "adapter_optimizer.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files
    adapter = load_file(step / "adapter.safetensors")
    assert len(adapter) == 2 * 2 * 7 and all(".lora_" in k and t.dtype == torch.float32 for k, t in adapter.items())
    assert json.loads((step / "adapter_config.json").read_text())["quantize"] == "4bit"
    tr = qruns["trainer"]
    model = tr.backend.raw_model
    assert all(is_quantized(m.weight) for m in lora_modules(model)) and len(lora_modules(model)) == 14
    # the run reports the parameters the model stands for, not the packed bytes of its 4-bit weights
    dense = sum(p.numel() for p in Transformer(tr.model_cfg).parameters())
    assert tr.provenance["trainable_parameters"] == 9728 and tr.provenance["parameters"] == dense + 9728


def test_qlora_resumes_exactly(qruns):
    first, second, straight = qruns["first"], qruns["second"], qruns["straight"]
    assert second["start_step"] == 2 and second["resumed_from"].endswith("step_00000002")
    assert {**first["losses"], **second["losses"]} == straight["losses"]


def test_merge_and_export_dequantize_to_the_trained_model(qruns):
    from transformers import AutoModelForCausalLM

    from train.hf_export import export_hf
    from train.sft.adapters import add_adapter_from, load_base, merge_checkpoint

    root = qruns["root"]
    step = str(root / "straight" / "checkpoints" / "step_00000004")
    x = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    qmodel = load_base(step)
    with torch.no_grad():
        plain_base = qmodel(x)[0]
        add_adapter_from(qmodel, step)
        assert all(is_quantized(m.weight) for m in lora_modules(qmodel))  # reloaded as trained: on NF4
        want = qmodel(x)[0]
    merged = merge_checkpoint(step, str(root / "merged"))
    from train import checkpoint as ckpt
    from train.checkpoint.full_state import load_weights, read_init_weights

    plain = Transformer(ckpt.read_model_config(merged)).eval()
    load_weights(plain, read_init_weights(merged, plain.cfg, "off"), merged)
    export_hf(merged, str(root / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf(x).logits, want, atol=1e-4, rtol=1e-4)
    assert (want - plain_base).abs().max() > 1e-3  # the adapter and the rounding do change the model


def test_generate_and_evaluate_load_a_qlora_checkpoint_as_the_trained_model(qruns):
    """launch/generate.py and evaluate.py (launch/_common.py) put the base on the device before
    the adapter re-quantizes it, so the NF4 rounding happens where training's did; here (the
    CPU) that gives the trained model's logits exactly."""
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, os.path.join(REPO, "launch"))
    from _common import load_model_and_tokenizer

    step = qruns["root"] / "straight" / "checkpoints" / "step_00000004"
    loaded, _, _ = load_model_and_tokenizer(str(step), torch.device("cpu"))
    assert len(lora_modules(loaded)) == 14 and all(is_quantized(m.weight) for m in lora_modules(loaded))
    x = torch.randint(4, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    trained = qruns["trainer"].backend.raw_model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], trained(x)[0])


@pytest.mark.parametrize("backend, why", [("fsdp", "FSDP shards parameters as DTensors"),
                                           ("deepspeed", "DeepSpeed ZeRO flattens them")])
def test_sharding_backends_are_refused_naming_the_key_and_why(tmp_path, qruns, monkeypatch, backend, why):
    if backend == "deepspeed":  # started as the deepspeed launcher starts it, else refused for that
        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            monkeypatch.setenv(var, value)
    data = chat_file(tmp_path, 4)
    with pytest.raises(ConfigError, match=f"{why}.*quant_state") as e:
        sft_cfg(tmp_path / "q", qruns["base"], [data], *QLORA, f"backend={backend}")
    assert e.value.key == "lora.quantize"


def test_the_trainer_asks_the_backend_whether_it_can_hold_4bit_weights(tmp_path, qruns, monkeypatch):
    """The run-time refusal follows the backend's capability flag, not its name: single and DDP
    hold plain modules, FSDP and DeepSpeed do not, and a backend=single that said otherwise is
    refused when the model is built."""
    from train.backends.ddp import DDPBackend
    from train.backends.deepspeed import DeepSpeedBackend
    from train.backends.fsdp import FSDPBackend
    from train.backends.single import SingleBackend
    from train.sft.trainer import SFTTrainer

    assert [b.holds_plain_modules for b in (SingleBackend, DDPBackend, FSDPBackend, DeepSpeedBackend)] == [
        True, True, False, False]
    monkeypatch.setattr(SingleBackend, "holds_plain_modules", False)
    cfg = sft_cfg(tmp_path / "q", qruns["base"], [chat_file(tmp_path, 4)], *QLORA, "backend=single")
    with pytest.raises(ConfigError, match="quant_state") as e:
        SFTTrainer(cfg)
    assert e.value.key == "lora.quantize"


def test_two_process_ddp_qlora_gives_the_single_process_losses(qruns):
    """Same global batch (2 ranks x micro 2 against 1 x micro 4): the all-reduced gradients
    of the adapters give the single-process losses; the 4-bit base is quantized identically
    on every rank."""
    import subprocess

    from tests.conftest import REPO
    from tests.ports import free_port
    from tests.sft_helpers import SFT_TINY
    from tests.test_sft_distributed import train_losses

    root = qruns["root"]
    run_dir = root / "ddp"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "launch/sft.py", *SFT_TINY,
           f"run_dir={run_dir}", f"init_from={qruns['base']}", f"sft.paths=[{root / 'chat0.jsonl'}]", *QLORA, *STEPS,
           "backend=ddp", "train.micro_batch_size=2"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "QLoRA: 14 base weights in NF4" in p.stdout + p.stderr
    ddp, single = train_losses(run_dir), qruns["straight"]["losses"]
    assert sorted(ddp) == sorted(single) == [1, 2, 3, 4]
    for s in ddp:
        assert ddp[s] == pytest.approx(single[s], rel=1e-4), (s, ddp[s], single[s])


def test_qlora_and_full_precision_adapters_cannot_share_a_base(qruns):
    """A QLoRA adapter needs the base NF4-rounded, a full-precision adapter needs it as it is:
    loading one beside the other is refused (either order) and leaves the model unchanged."""
    from train.sft.adapters import add_adapter_from, load_base

    q = str(qruns["root"] / "straight" / "checkpoints" / "step_00000004")
    full = str(qruns["root"] / "lora" / "checkpoints" / "step_00000004")
    x = torch.randint(4, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    for first, second, kind in ((q, full, "full-precision adapter"), (full, q, "QLoRA")):
        model = load_base(q)
        add_adapter_from(model, first, "first")
        with torch.no_grad():
            before = model(x)[0]
        with pytest.raises(ValueError, match=f"is a {kind}.*already holds .*\\['first'\\]"):
            add_adapter_from(model, second, "second")
        assert all(set(m.scale) == {"first"} for m in lora_modules(model))
        assert all(is_quantized(m.weight) == (first == q) for m in lora_modules(model))
        with torch.no_grad():
            assert torch.equal(model(x)[0], before)

    # two QLoRA adapters share a base only when they quantize the same projections
    model = load_base(q)
    add_lora(model, "wq_only", rank=2, alpha=2, targets=["wq"])
    quantize_base_4bit(model, adapter="wq_only")
    with pytest.raises(ValueError, match="QLoRA adapters share one base only with the same targets"):
        add_adapter_from(model, q, "second")
    model = load_base(q)
    add_adapter_from(model, q, "one")
    add_adapter_from(model, q, "two")  # same targets: allowed
    assert all(set(m.scale) == {"one", "two"} and is_quantized(m.weight) for m in lora_modules(model))
