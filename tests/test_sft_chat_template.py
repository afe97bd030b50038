"""One chat template everywhere: what SFT trains on, what the checkpoint stores
(chat_template.jinja), what the exported HF tokenizer's apply_chat_template produces, and what
launch/generate.py --chat feeds the model are the same token ids."""

from __future__ import annotations

import os
import sys

import pytest

from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
from train.sft.chat import JINJA_TEMPLATE, encode_chat, encode_prompt

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "What does `json.dumps()` do?"},
     {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
     {"role": "user", "content": "And 42 + 7?\n  Indented, déjà vu, 日本語."},
     {"role": "assistant", "content": " 49 (leading space kept)"}],
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer_path):
    from train.sft.trainer import SFTTrainer

    base = tiny_checkpoint(tmp_path_factory, tokenizer_path)
    tmp = tmp_path_factory.mktemp("sft_chat")
    cfg = sft_cfg(tmp / "run", base, [chat_file(tmp, 16)], "train.max_steps=2", "checkpoint.every=2",
                  "eval.prompts=[What is a list?,Hi there]", "eval.max_new_tokens=4", "logger.plot=true")
    SFTTrainer(cfg).fit()
    return tmp / "run"


def test_before_after_generations_and_one_loss_plot_for_both_runs(sft_run):
    table = (sft_run / "generations.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| What is a list?") or line.startswith("| Hi")]
    assert len(rows) == 2 and all(row.count(" | ") == 2 for row in rows)
    assert "| prompt | base model | fine-tuned |" in table
    import json

    base = json.loads((sft_run / "generations_base.json").read_text())
    assert list(base["answers"]) == ["What is a list?", "Hi there"]
    png = sft_run / "loss.png"
    assert png.is_file() and png.stat().st_size > 10_000


def test_checkpoint_carries_tokenizer_and_template(sft_run):
    step = sft_run / "checkpoints" / "step_00000002"
    assert (step / "tokenizer.model").is_file() and (step / "model.safetensors").is_file()
    assert (step / "chat_template.jinja").read_text() == JINJA_TEMPLATE


def test_hf_apply_chat_template_gives_kiln_ids(sft_run, tmp_path, tokenizer):
    from transformers import AutoTokenizer

    from train.hf_export import export_hf

    summary = export_hf(str(sft_run), str(tmp_path / "hf"))
    assert summary["chat_template"]
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        for gen in (False, True):
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert list(ids) == encode_chat(tokenizer, messages, add_generation_prompt=gen).ids
    prompt = hf.apply_chat_template(CONVERSATIONS[0][:1], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert list(prompt) == encode_prompt(tokenizer, "Hi there")
    with pytest.raises(Exception, match="unknown role"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_generate_chat_mode_uses_the_training_ids(sft_run, tokenizer, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch"))
    import generate

    for system in ("", "You answer in one line."):
        text = generate.chat_text("What is a list?", system or None)
        assert tokenizer.encode(text) == encode_prompt(tokenizer, "What is a list?", system or None)
    rc = generate.main([str(sft_run), "--prompt", "What is a list?", "--chat", "--temperature", "0",
                        "--max-new-tokens", "4", "--format", "jsonl"])
    assert rc == 0 and '"prompt": "What is a list?"' in capsys.readouterr().out
