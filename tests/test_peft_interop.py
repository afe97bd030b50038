"""PEFT interop with the real peft: a kiln adapter checkpoint exported as a PEFT directory gives
kiln's logits through ``PeftModel.from_pretrained`` on kiln's HF export (1e-5), a
rank-concatenated blend (per-module ranks) too, and a PEFT adapter (rsLoRA, rank and alpha
patterns that are regular expressions) imported onto the kiln model gives PEFT's logits (1e-5).
The config is read against an allowlist of peft's LoraConfig fields. Everything is built locally."""

from __future__ import annotations

import json

import pytest
import torch

from model.peft_interop import HONOURED, NEUTRAL, REFUSED, UnsupportedAdapterError, _pattern_value, check_peft_config, save_peft_adapter
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


@torch.no_grad()
def test_regex_rank_and_alpha_patterns_import_with_peft_logits(made, tmp_path):
    """PEFT reads each pattern key as a regular expression on the module name; a suffix rule would
    miss both keys here (rank 3 against the file's rank-6 factors, alpha 5 instead of 32). The
    dropout is kept for further training (both models are in eval mode)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from train.sft.adapters import load_base

    torch.manual_seed(3)
    config = LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1,
                        rank_pattern={r"layers\.1\.(self_attn\.v|mlp\.down)_proj": 6},
                        alpha_pattern={r"layers\.0\.self_attn\.q_proj": 2.0, "q_proj|v_proj": 32.0})
    peft = get_peft_model(hf_model(made), config).eval()
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.05)
    peft.save_pretrained(str(tmp_path / "p"))
    want = peft(X).logits
    torch.testing.assert_close(PeftModel.from_pretrained(hf_model(made), str(tmp_path / "p")).eval()(X).logits, want)

    kiln = load_base(str(made / "lora" / "checkpoints" / "step_00000002")).eval()
    load_peft_adapter(kiln, str(tmp_path / "p"), "imported")
    ranks_scales = {m: (kiln.get_submodule(m).A("imported").shape[0], kiln.get_submodule(m).scale["imported"])
                    for m in ("layers.0.attn.wq", "layers.1.attn.wq", "layers.0.attn.wv", "layers.1.attn.wv",
                              "layers.0.mlp.w2", "layers.1.mlp.w2")}
    assert ranks_scales == pytest.approx({"layers.0.attn.wq": (3, 2 / 3), "layers.1.attn.wq": (3, 32 / 3),
                                          "layers.0.attn.wv": (3, 32 / 3), "layers.1.attn.wv": (6, 32 / 6),
                                          "layers.0.mlp.w2": (3, 5 / 3), "layers.1.mlp.w2": (6, 5 / 6)})
    assert kiln.get_submodule("layers.1.mlp.w2").lora_dropout["imported"].p == 0.1  # for further training
    torch.testing.assert_close(kiln(X)[0], want, atol=1e-5, rtol=1e-5)


def test_pattern_keys_resolve_as_peft_resolves_them():
    """kiln's resolution against peft's own get_pattern_key: regular expressions, whole dotted parts
    only ('proj' is not 'q_proj'), the first matching key winning, no match the default."""
    from peft.utils.other import get_pattern_key

    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.10.mlp.down_proj"]
    pattern_sets = [{"q_proj": 1}, {"q_proj|v_proj": 2}, {"proj": 3}, {"_proj": 4}, {"layers.0.self_attn.q_proj": 5},
                    {"model.layers.0.self_attn.q_proj": 6}, {"ayers.0.self_attn.q_proj": 7}, {r"0\..*q_proj": 8},
                    {"q_proj|v_proj": 9, r"layers\.0\.self_attn\.q_proj": 10}, {r"layers\.1\..*": 11, "v_proj": 12},
                    {r"layers\.1": 13}, {".*": 14}, {r"mlp\.(gate|down)_proj": 15}, {}]
    resolved = []
    for patterns in pattern_sets:
        for name in names:
            got = _pattern_value(patterns, name, -1)
            assert got == patterns.get(get_pattern_key(patterns.keys(), name), -1), (patterns, name)
            resolved.append(got)
    assert {1, 2, 5, 6, 8, 9, 11, 14, 15, -1} <= set(resolved) and not {3, 4, 7, 10, 12, 13} & set(resolved)


def test_malformed_patterns_are_refused_naming_the_key():
    for field, patterns in (("rank_pattern", {"(": 4}), ("rank_pattern", {"q_proj": 2.5}), ("alpha_pattern", {"q_proj": 0})):
        with pytest.raises(UnsupportedAdapterError) as e:
            check_peft_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, field: patterns})
        assert e.value.field == f"{field}[{next(iter(patterns))}]"


def test_every_lora_config_field_of_the_installed_peft_is_known():
    """The allowlist covers each field of peft's LoraConfig once, a refused field's default is
    peft's, and a config of peft's defaults passes."""
    import dataclasses

    from peft import LoraConfig

    kinds = [set(HONOURED), set(NEUTRAL), set(REFUSED)]
    assert sum(map(len, kinds)) == len(set().union(*kinds))
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(LoraConfig)}
    assert set(defaults) <= set().union(*kinds), set(defaults) - set().union(*kinds)
    assert {f: d for f, (d, _) in REFUSED.items()} == {f: defaults[f] for f in REFUSED}
    cfg = json.loads(json.dumps(LoraConfig().to_dict(), default=str))
    assert set(cfg) >= set(REFUSED) and check_peft_config(cfg) is cfg


def test_adapters_kiln_cannot_compute_are_refused_naming_the_field(made, tmp_path):
    from train.sft.adapters import load_base

    kiln = load_base(str(made / "lora" / "checkpoints" / "step_00000002"))
    save_peft_adapter(kiln_with_adapter(made), "default", str(tmp_path / "d"))
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    for field, value in (("use_dora", True), ("bias", "all"), ("fan_in_fan_out", True),
                         ("modules_to_save", ["lm_head"]), ("layer_replication", [[0, 2]]),
                         ("alora_invocation_tokens", [5]), ("use_qalora", True), ("init_lora_weights", "pissa"),
                         ("option_of_a_newer_peft", 3), ("lora_dropout", 1.5)):
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


@torch.no_grad()
def test_fields_at_their_defaults_import(made, tmp_path):
    """Every LoraConfig field at peft's default, and fields kiln does not know left null, false or
    empty, import as the plain config does."""
    from peft import LoraConfig

    from model.lora import set_active_adapter
    from train.sft.adapters import load_base

    save_peft_adapter(kiln_with_adapter(made), "default", str(tmp_path / "d"))
    plain = json.loads((tmp_path / "d" / "adapter_config.json").read_text())
    kiln = load_base(str(made / "lora" / "checkpoints" / "step_00000002")).eval()
    load_peft_adapter(kiln, str(tmp_path / "d"), "plain")
    want = kiln(X)[0]
    defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=str))
    (tmp_path / "d" / "adapter_config.json").write_text(json.dumps(
        {**defaults, **plain, "option_of_a_newer_peft": None, "another": False, "a_list": []}))
    load_peft_adapter(kiln, str(tmp_path / "d"), "defaults")
    assert torch.equal(kiln(X)[0], want)
    set_active_adapter(kiln, None)
    assert (kiln(X)[0] - want).abs().max() > 1e-4  # the imported adapter is what gives them
