"""PEFT interop with the real peft: a kiln adapter checkpoint exported as a PEFT directory gives
kiln's logits through ``PeftModel.from_pretrained`` on kiln's HF export (1e-5), a
rank-concatenated blend (per-module ranks) too, and a PEFT adapter (rsLoRA, a rank pattern)
imported onto the kiln model gives PEFT's logits (1e-5). Everything is built locally."""

from __future__ import annotations

import json

import pytest
import torch

from model.peft_interop import UnsupportedAdapterError, save_peft_adapter
from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
from train.checkpoint import CheckpointError
from train.sft.adapters import load_peft_adapter

X = torch.randint(4, 1000, (2, 20), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def made(tmp_path_factory, tokenizer_path):
    """A tiny base, its HF export, and a 2-step LoRA fine-tune of it (adapter checkpoint)."""
    from train.hf_export import export_hf
    from train.sft.trainer import SFTTrainer

    root = tmp_path_factory.mktemp("peft")
    base = tiny_checkpoint(tmp_path_factory, tokenizer_path)
    export_hf(base, str(root / "hf"))
    SFTTrainer(sft_cfg(root / "lora", base, [chat_file(root, 16)], "lora.enabled=true", "lora.rank=4",
                       "lora.alpha=8", "train.max_steps=2", "checkpoint.every=2")).fit()
    return root


def hf_model(root):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32).eval()


def kiln_with_adapter(root):
    from train.sft.adapters import add_adapter_from, load_base

    step = str(root / "lora" / "checkpoints" / "step_00000002")
    model = load_base(step)
    add_adapter_from(model, step)
    return model.eval()


@torch.no_grad()
def test_exported_adapter_loads_in_peft_with_kilns_logits(made):
    from peft import PeftModel

    from train.sft.adapters import export_peft

    cfg = export_peft(str(made / "lora"), str(made / "peft"))
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and not cfg["rank_pattern"]
    on_disk = json.loads((made / "peft" / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "LORA" and sorted(on_disk["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    kiln = kiln_with_adapter(made)
    peft = PeftModel.from_pretrained(hf_model(made), str(made / "peft")).eval()
    want = kiln(X)[0]
    torch.testing.assert_close(peft(X).logits, want, atol=1e-5, rtol=1e-5)
    with peft.disable_adapter():
        assert (peft(X).logits - want).abs().max() > 1e-4  # the adapter is what makes them agree


@torch.no_grad()
def test_a_rank_concatenated_blend_exports_with_per_module_ranks(made, tmp_path):
    from peft import PeftModel

    from model.adapter_mix import add_blended_adapter
    from model.lora import add_lora, set_active_adapter

    kiln = kiln_with_adapter(made)
    torch.manual_seed(1)
    add_lora(kiln, "other", rank=2, alpha=3, targets=["wq", "w2"])
    with torch.no_grad():
        for n, p in kiln.named_parameters():
            if n.endswith("lora_B_other"):
                p.normal_(0, 0.05)
    add_blended_adapter(kiln, "mix", {"default": 0.5, "other": 1.5})
    set_active_adapter(kiln, "mix")
    cfg = save_peft_adapter(kiln, "mix", str(tmp_path / "mix"))
    assert cfg["rank_pattern"] and set(cfg["rank_pattern"].values()) == {6}  # 4 + 2 where both adapters are
    peft = PeftModel.from_pretrained(hf_model(made), str(tmp_path / "mix")).eval()
    torch.testing.assert_close(peft(X).logits, kiln(X)[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_peft_adapter_imports_onto_kiln_with_peft_logits(made, tmp_path):
    from peft import LoraConfig, get_peft_model

    from model.lora import set_active_adapter
    from train.sft.adapters import load_base

    torch.manual_seed(2)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                        rank_pattern={"q_proj": 5}, lora_dropout=0.0)
    peft = get_peft_model(hf_model(made), config).eval()
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    peft.save_pretrained(str(tmp_path / "p"))
    want = peft(X).logits

    kiln = load_base(str(made / "lora" / "checkpoints" / "step_00000002")).eval()
    plain = kiln(X)[0]
    names = load_peft_adapter(kiln, str(tmp_path / "p"), "imported")
    assert len(names) == 2 * 3 * 2  # q, v, down in both layers
    assert dict(kiln.named_parameters())["layers.0.attn.wq.lora_A_imported"].shape[0] == 5
    torch.testing.assert_close(kiln(X)[0], want, atol=1e-5, rtol=1e-5)
    set_active_adapter(kiln, None)
    assert torch.equal(kiln(X)[0], plain)


def test_adapters_kiln_cannot_compute_are_refused_naming_the_field(made, tmp_path):
    from train.sft.adapters import load_base

    kiln = load_base(str(made / "lora" / "checkpoints" / "step_00000002"))
    save_peft_adapter(kiln_with_adapter(made), "default", str(tmp_path / "d"))
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    for field, value in (("use_dora", True), ("bias", "all"), ("fan_in_fan_out", True),
                         ("modules_to_save", ["lm_head"]), ("layer_replication", [[0, 2]])):
        (tmp_path / "d" / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
        with pytest.raises(UnsupportedAdapterError, match=field) as e:
            load_peft_adapter(kiln, str(tmp_path / "d"))
        assert e.value.field == field


def test_a_peft_directory_is_read_as_untrusted_input(made, tmp_path):
    """Symlinked files are never followed, malformed JSON names the file, a pickled
    adapter_model.bin is not read, and a factor whose shape is not (r, in) / (out, r) exactly
    (one with a size-1 dimension that copy_ would broadcast too) is refused naming the tensor,
    leaving the model without the adapter."""
    from safetensors.torch import load_file, save_file

    from model.lora import LoRALinear
    from train.sft.adapters import load_base

    kiln = load_base(str(made / "lora" / "checkpoints" / "step_00000002"))
    good = tmp_path / "good"
    save_peft_adapter(kiln_with_adapter(made), "default", str(good))

    for linked in ("adapter_config.json", "adapter_model.safetensors"):
        d = tmp_path / f"link_{linked}"
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (d / f).symlink_to(good / f) if f == linked else (d / f).write_bytes((good / f).read_bytes())
        with pytest.raises(CheckpointError, match=f"{linked}: not a regular file"):
            load_peft_adapter(kiln, str(d))

    bad = tmp_path / "bad_json"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="adapter_config.json: cannot be read as JSON"):
        load_peft_adapter(kiln, str(bad))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
    torch.save(load_file(str(good / "adapter_model.safetensors")), str(pickled / "adapter_model.bin"))
    with pytest.raises(UnsupportedAdapterError, match="adapter_model.bin is never read"):
        load_peft_adapter(kiln, str(pickled))

    tensors = load_file(str(good / "adapter_model.safetensors"))
    key_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    key_b = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    r, dim = tensors[key_a].shape
    for key, shape in ((key_a, (r, dim + 1)), (key_a, (r, 1)), (key_b, (1, r)),
                       (key_b, (tensors[key_b].shape[0] + 1, r))):
        wrong = tmp_path / f"shape_{key.rsplit('.', 3)[1]}_{shape[0]}_{shape[1]}"
        wrong.mkdir()
        (wrong / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
        save_file({**tensors, key: torch.zeros(shape)}, str(wrong / "adapter_model.safetensors"))
        with pytest.raises(UnsupportedAdapterError, match=key.replace(".", r"\.")) as e:
            load_peft_adapter(kiln, str(wrong), "wrong")
        assert e.value.field == f"weights[{key}]"
    assert not any(isinstance(m, LoRALinear) and "wrong" in m.scale for m in kiln.modules())
