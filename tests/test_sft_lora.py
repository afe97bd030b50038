"""LoRA: exact parameter count, starts as the base model, trains only adapters, merges exactly,
small adapter-only checkpoints that resume with their optimizer state, several named adapters
on one base, a classification head saved with its adapter (QLoRA: tests/test_qlora.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from model.llama import ModelConfig, Transformer
from model.lora import add_lora, lora_param_count, merged_state_dict, set_active_adapter, train_only
from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint, write_jsonl

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
LORA = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]


def tokens():
    return torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def test_rank_r_adds_exactly_the_expected_parameters():
    model = Transformer(CFG)
    before = sum(p.numel() for p in model.parameters())
    add_lora(model, "default", rank=4, alpha=8)
    added = sum(p.numel() for p in model.parameters()) - before
    # Per layer, r * (in + out): wq 64+64, wk 64+32, wv 64+32, wo 64+64, w1/w3 64+192, w2 192+64.
    assert added == 2 * 4 * (128 + 96 + 96 + 128 + 256 + 256 + 256) == 9728
    assert added == lora_param_count(CFG, 4, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    assert lora_param_count(CFG, 4, ["wq", "wv"]) == 2 * 4 * (128 + 96)


def test_fresh_adapter_is_the_base_model_and_only_adapters_train():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    base_logits = model(tokens())[0]
    names = add_lora(model, "default", rank=4, alpha=8)
    assert torch.equal(model(tokens())[0], base_logits)
    assert sorted(train_only(model, "default")) == sorted(names)
    assert "layers.0.attn.wq.weight" in dict(model.named_parameters())  # base names unchanged


def test_merge_gives_the_same_logits():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    add_lora(model, "default", rank=4, alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained-looking adapter
    plain = Transformer(CFG).eval()
    plain.load_state_dict(merged_state_dict(model), strict=True)
    out = model(tokens())[0]
    torch.testing.assert_close(plain(tokens())[0], out, atol=1e-5, rtol=1e-5)
    set_active_adapter(model, None)
    assert (model(tokens())[0] - out).abs().max() > 1e-3  # the adapter does change the model


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


def run_sft(run_dir, base, data, *extra):
    from train.sft.trainer import SFTTrainer

    tr = SFTTrainer(sft_cfg(run_dir, base, [data], *extra))
    return tr, tr.fit()


def test_adapter_run_trains_only_adapters_and_checkpoints_them_alone(tmp_path, base):
    from safetensors.torch import load_file

    data = chat_file(tmp_path, 24)
    tr, res = run_sft(tmp_path / "run", base, data, *LORA, "train.max_steps=3", "checkpoint.every=3")
    model = tr.backend.raw_model
    start = load_file(os.path.join(base, "checkpoints", "step_00000002", "model.safetensors"))
    for n, p in model.named_parameters():
        if ".lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and torch.equal(p.detach(), start[n]), n
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B moved off zero
    step = tmp_path / "run" / "checkpoints" / "step_00000003"
    files = set(os.listdir(step))
    assert {"adapter.safetensors", "adapter_optimizer.safetensors", "adapter_config.json"} <= files
    assert "model.safetensors" not in files
    adapter = load_file(step / "adapter.safetensors")
    assert len(adapter) == 2 * 7 * 2 and all(".lora_" in k for k in adapter)
    assert os.path.getsize(step / "adapter.safetensors") < 0.2 * os.path.getsize(
        os.path.join(base, "checkpoints", "step_00000002", "model.safetensors"))
    assert res["losses"][3] < res["losses"][1]


def test_adapter_run_resumes_exactly_with_its_optimizer_state(tmp_path, base):
    data = chat_file(tmp_path, 24)
    _, straight = run_sft(tmp_path / "a", base, data, *LORA, "train.max_steps=4")
    _, first = run_sft(tmp_path / "b", base, data, *LORA, "train.max_steps=4", "train.stop_at_step=2")
    _, second = run_sft(tmp_path / "b", base, data, *LORA, "train.max_steps=4")
    assert second["start_step"] == 2 and second["resumed_from"].endswith("step_00000002")
    assert {**first["losses"], **second["losses"]} == straight["losses"]


def test_named_adapters_share_one_base_and_merge_for_export(tmp_path, base):
    from transformers import AutoModelForCausalLM

    from train.hf_export import export_hf
    from train.sft.adapters import add_adapter_from, load_base, merge_checkpoint

    run_sft(tmp_path / "a", base, chat_file(tmp_path, 24, seed=1), *LORA, "train.max_steps=3")
    run_sft(tmp_path / "b", base, chat_file(tmp_path, 24, seed=2), *LORA, "train.max_steps=3", "lora.rank=2",
            "lora.targets=[wq,wv]")
    step_a = tmp_path / "a" / "checkpoints" / "step_00000003"
    step_b = tmp_path / "b" / "checkpoints" / "step_00000003"
    model = load_base(str(step_a))
    x = tokens()
    with torch.no_grad():
        base_out = model(x)[0]
        add_adapter_from(model, str(step_a), "python")
        add_adapter_from(model, str(step_b), "other")
        set_active_adapter(model, "python")
        out_a = model(x)[0]
        set_active_adapter(model, "other")
        out_b = model(x)[0]
        set_active_adapter(model, None)
        assert torch.equal(model(x)[0], base_out)
        alone = load_base(str(step_a))
        add_adapter_from(alone, str(step_a))
        torch.testing.assert_close(alone(x)[0], out_a)
    assert (out_a - out_b).abs().max() > 1e-4 and (out_a - base_out).abs().max() > 1e-4

    merged = merge_checkpoint(str(tmp_path / "a"), str(tmp_path / "merged"))
    export_hf(merged, str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, out_a, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "hf" / "chat_template.jinja").is_file()


def test_classification_head_is_saved_with_its_adapter(tmp_path, base):
    from safetensors.torch import load_file

    rows = [{"text": f"{w} page number {i}", "label": w} for i in range(12) for w in ("good", "spam")]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    run_sft(tmp_path / "cls", base, data, *LORA, "task=classification", "train.max_steps=2", "checkpoint.every=2")
    step = tmp_path / "cls" / "checkpoints" / "step_00000002"
    adapter = load_file(step / "adapter.safetensors")
    assert "score.weight" in adapter and adapter["score.weight"].shape == (2, 64)
    assert json.loads((step / "adapter_config.json").read_text())["labels"] == ["good", "spam"]


def test_runs_say_where_their_weights_came_from_and_how_much_trains(base, tmp_path, tiny_cfg, capsys):
    from train.sft.trainer import SFTTrainer
    from train.trainer import Trainer

    fresh = Trainer(tiny_cfg("train.max_steps=1", "checkpoint.every=1"))
    fresh.fit()
    assert fresh.provenance["weights_from"] == "fresh init" and fresh.provenance["trainable_share"] == 1.0
    assert "starting weights: fresh init (seed 1337)" in capsys.readouterr().out

    tr = SFTTrainer(sft_cfg(tmp_path / "lora", base, [chat_file(tmp_path, 8)], *LORA, "train.max_steps=1",
                            "checkpoint.every=1"))
    tr.fit()
    pv = tr.provenance
    assert pv["weights_from"] == "kiln checkpoint" and pv["step"] == 2 and pv["path"].endswith("step_00000002")
    assert pv["trainable_parameters"] == 9728 and 0 < pv["trainable_share"] < 0.2
    out = capsys.readouterr().out
    assert f"trainable parameters: 9,728 of {pv['parameters']:,}" in out
    with open(tmp_path / "lora" / "metrics.jsonl") as f:
        run = [r for r in map(json.loads, f) if r["kind"] == "run"]
    assert run and run[0]["weights_from"] == "kiln checkpoint" and run[0]["trainable_parameters"] == 9728
    meta = json.load(open(tmp_path / "lora" / "checkpoints" / "step_00000001" / "meta.json"))
    assert meta["provenance"]["path"] == pv["path"]


def test_generate_runs_an_adapter_only_checkpoint_as_its_merged_model(tmp_path, base):
    import subprocess
    import sys

    from tests.conftest import REPO

    run_sft(tmp_path / "run", base, chat_file(tmp_path, 24), *LORA, "train.max_steps=2", "checkpoint.every=2")

    def gen(path):
        p = subprocess.run([sys.executable, "launch/generate.py", str(path), "--prompt", "What is a list?", "--chat",
                            "--temperature", "0", "--max-new-tokens", "6"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return p

    adapter = gen(tmp_path / "run")
    assert "holds a LoRA adapter" in adapter.stderr
    assert "user: What is a list?\nassistant: " in adapter.stdout
    subprocess.run([sys.executable, "launch/merge_lora.py", str(tmp_path / "run"), str(tmp_path / "merged")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    assert gen(tmp_path / "merged").stdout == adapter.stdout


def test_bad_option_values_and_missing_directories_name_the_key_without_a_traceback(tmp_path, base):
    import subprocess
    import sys

    from tests.conftest import REPO

    p = subprocess.run([sys.executable, "launch/generate.py", base, "--prompt", "x", "--temperature", "abc"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "argument --temperature: invalid float value: 'abc'" in p.stderr
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "launch/pretrain.py", "init_from=hf:/nonexistent", f"run_dir={tmp_path / 'r'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "init_from: Hugging Face directory not found: 'hf:/nonexistent'" in p.stderr
    p = subprocess.run([sys.executable, "launch/convert_checkpoint.py", str(tmp_path / "missing"), str(tmp_path / "o"),
                        "--to", "full"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3 and "no complete kiln checkpoint at" in p.stderr and "Traceback" not in p.stderr
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    p = subprocess.run([sys.executable, "launch/convert_checkpoint.py", base, str(existing), "--to", "full"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "exists; refusing to overwrite it" in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(existing) == ["keep.txt"]
