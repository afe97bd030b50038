"""Prompt tuning: N virtual-token embeddings before every input, the base frozen.

A table initialised from a text's embeddings must make the model compute exactly what the
base computes with that text in front (LM logits, greedy generation, classifier logits),
training must change the table only, and checkpoints hold the table alone and resume exactly."""

from __future__ import annotations

import os

import pytest
import torch

from model.classifier import TransformerClassifier
from model.llama import ModelConfig, Transformer, generate
from model.prompt_tuning import PROMPT, add_prompt_tuning, prepend, train_only_prompt, virtual_ids, with_virtual_ids

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
TEXT = [11, 12, 13, 14, 15]  # a "text's" token ids
X = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def text_in_front(x):
    return torch.cat([torch.tensor(TEXT).expand(x.shape[0], -1), x], dim=1)


@torch.no_grad()
def test_a_table_initialised_from_a_text_computes_the_text_in_front():
    torch.manual_seed(0)
    base = Transformer(CFG).eval()
    want = base(text_in_front(X))[0][:, len(TEXT):]
    name = add_prompt_tuning(base, len(TEXT), init_ids=TEXT)
    assert name == PROMPT and virtual_ids(base) == [128, 129, 130, 131, 132]
    tokens, _, _ = prepend(base, X)
    assert torch.equal(base(tokens)[0][:, len(TEXT):], want)
    # greedy generation of prompts of different lengths (left padding) with the virtual ids in front
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = Transformer(CFG).eval()
    plain.load_state_dict({k: v for k, v in base.state_dict().items() if k != PROMPT})
    out = generate(base, with_virtual_ids(base, prompts), 6, temperature=0.0)
    assert torch.equal(out, generate(plain, [TEXT + p for p in prompts], 6, temperature=0.0))


@torch.no_grad()
def test_classifier_pools_the_last_real_token_after_the_virtual_ones():
    torch.manual_seed(0)
    cls = TransformerClassifier(CFG, 3).eval()
    last = torch.tensor([11, 6])  # the second row is right-padded after position 6
    want = cls(text_in_front(X), last_index=last + len(TEXT))[0]
    add_prompt_tuning(cls, len(TEXT), init_ids=TEXT)
    tokens, y, kw = prepend(cls, X, torch.tensor([0, 2]), classification=True, last_index=last)
    assert torch.equal(y, torch.tensor([0, 2]))
    torch.testing.assert_close(cls(tokens, **kw)[0], want, atol=1e-6, rtol=1e-6)


def test_training_changes_only_the_virtual_token_table():
    torch.manual_seed(0)
    model = Transformer(CFG)
    add_prompt_tuning(model, 4, seed=3)  # from the vocabulary
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = model.tok_embeddings.weight[torch.randint(0, 128, (4,), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(before[PROMPT], rows)  # initialised from vocabulary rows
    assert train_only_prompt(model) == [PROMPT]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x, y, _ = prepend(model, X[:, :-1], X[:, 1:])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n == PROMPT:
            assert (p - before[n]).abs().max() > 1e-3
        else:
            assert torch.equal(p, before[n]), n


PT = ["prompt_tuning.enabled=true", "prompt_tuning.n_tokens=6", "prompt_tuning.init_text=Answer briefly.",
      "sft.packing=false", "data.seq_len=32"]


@pytest.fixture(scope="module")
def pt_runs(tmp_path_factory, tokenizer_path):
    """Prompt-tuned fine-tunes of the tiny base: straight to step 4, and stopped at 2 then resumed."""
    from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
    from train.sft.trainer import SFTTrainer

    root = tmp_path_factory.mktemp("prompt_tuning")
    base = tiny_checkpoint(tmp_path_factory, tokenizer_path)
    data = chat_file(root, 24)

    def run(name, *extra):
        tr = SFTTrainer(sft_cfg(root / name, base, [data], *PT, "train.max_steps=4", "checkpoint.every=2", *extra))
        return tr, tr.fit()

    straight_tr, straight = run("straight")
    _, first = run("resumed", "train.stop_at_step=2")
    _, second = run("resumed")
    return {"root": root, "base": base, "trainer": straight_tr, "straight": straight, "first": first,
            "second": second}


@pytest.mark.parametrize("override, key, named", [
    ("lora.enabled=true", "prompt_tuning.enabled", "lora.enabled"),
    ("sft.packing=true", "prompt_tuning.enabled", "sft.packing"),
    ("backend=fsdp", "prompt_tuning.enabled", "backend=fsdp"),
    ("backend=deepspeed", "prompt_tuning.enabled", "backend=deepspeed"),
    ("prompt_tuning.n_tokens=33", "prompt_tuning.n_tokens", "data.seq_len=32"),  # 33 + 32 > max_seq_len=64
])
def test_refused_settings_are_config_errors_before_any_model(override, key, named, tmp_path, tmp_path_factory,
                                                             tokenizer_path, monkeypatch):
    """What prompt tuning cannot run with must stop the run at once, saying which setting to
    change: a ConfigError naming the key and the setting it clashes with, the first four when the
    config is read, the length one (it needs the checkpoint's max_seq_len) when the architecture
    is read, before the model is built and the base loaded."""
    from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
    from train.config import ConfigError
    from train.sft.trainer import SFTTrainer
    from train.tasks.finetune import FinetuneTask

    base, data = tiny_checkpoint(tmp_path_factory, tokenizer_path), chat_file(tmp_path, 4)
    monkeypatch.setattr(FinetuneTask, "build_model", lambda self: pytest.fail("a model was built"))
    if override == "backend=deepspeed":  # started as the deepspeed launcher starts it, else refused for that
        for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            monkeypatch.setenv(var, value)
    settings = [o for o in PT if o.split("=")[0] != override.split("=")[0]] + [override]
    with pytest.raises(ConfigError) as e:
        SFTTrainer(sft_cfg(tmp_path / "run", base, [data], *settings))
    assert e.value.key == key and str(e.value).startswith(f"config error: {key}: ")
    assert named in str(e.value), str(e.value)


def test_a_run_trains_the_table_only_and_checkpoints_it_alone(pt_runs):
    import json
    import os

    from safetensors.torch import load_file

    model = pt_runs["trainer"].backend.raw_model
    start = load_file(os.path.join(pt_runs["base"], "checkpoints", "step_00000002", "model.safetensors"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained == [PROMPT]
    for n, p in model.named_parameters():
        if n != PROMPT:
            assert torch.equal(p.detach(), start[n]), n
    tok = pt_runs["trainer"].tokenizer
    init = start["tok_embeddings.weight"][[tok.encode("Answer briefly.")[i % len(tok.encode("Answer briefly."))]
                                          for i in range(6)]]
    assert (model.tok_embeddings.prompt.detach() - init).abs().max() > 1e-4  # it moved from the text's rows
    step = pt_runs["root"] / "straight" / "checkpoints" / "step_00000004"
    table = load_file(step / "adapter.safetensors")
    assert list(table) == [PROMPT] and table[PROMPT].shape == (6, 64)
    assert "model.safetensors" not in os.listdir(step)
    assert json.loads((step / "prompt_tuning.json").read_text())["n_tokens"] == 6


def test_a_prompt_tuning_run_resumes_exactly(pt_runs):
    first, second, straight = pt_runs["first"], pt_runs["second"], pt_runs["straight"]
    assert second["start_step"] == 2 and second["resumed_from"].endswith("step_00000002")
    assert {**first["losses"], **second["losses"]} == straight["losses"]


def test_classification_with_prompt_tuning_trains_table_and_head(pt_runs, tmp_path):
    """On data the first word separates, 10 steps of table + head reach accuracy and macro-F1
    >= 0.9 on the 18 held-out rows (measured: 1.0) where the untrained model does not (0.39),
    and the checkpoint holds exactly the table and the head."""
    from safetensors.torch import load_file

    from tests.sft_helpers import sft_cfg, write_jsonl
    from train.sft.trainer import SFTTrainer

    rows = [{"text": f"{w} page number {i}", "label": w} for i in range(24) for w in ("good", "spam")]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    tr = SFTTrainer(sft_cfg(tmp_path / "cls", pt_runs["base"], [data], *PT[:3], "data.seq_len=32", "task=classification",
                            "train.max_steps=10", "checkpoint.every=10", "sft.val_fraction=0.3", "train.eval_every=10",
                            "optim.lr=3e-2"))
    tr.task.evaluate()
    assert tr.task.metrics["n"] == 18 and tr.task.metrics["accuracy"] < 0.9  # untrained
    res = tr.fit()
    assert sorted(n for n, p in tr.backend.raw_model.named_parameters() if p.requires_grad) == [
        "score.weight", PROMPT]
    assert res["classification"]["accuracy"] >= 0.9 and res["classification"]["macro_f1"] >= 0.9
    saved = load_file(tmp_path / "cls" / "checkpoints" / "step_00000010" / "adapter.safetensors")
    assert sorted(saved) == ["score.weight", PROMPT]


def test_generate_launcher_runs_a_prompt_tuned_checkpoint_like_the_runs_model(pt_runs, capsys):
    """launch/generate.py on a prompt-tuning checkpoint loads its base (digest checked) with the
    table and gives the greedy tokens of the run's own model with the virtual ids in front."""
    import json
    import os
    import sys

    from model.llama import generate as lm_generate

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "launch"))
    import generate as launcher

    step = pt_runs["root"] / "straight" / "checkpoints" / "step_00000004"
    cfg = json.loads((step / "prompt_tuning.json").read_text())
    assert cfg["base_digest"]
    tr = pt_runs["trainer"]
    prompts = ["What is a list?", "Say hi"]
    got = launcher.run(str(step), prompts, {**launcher.OPTIONS, "temperature": 0.0, "max_new_tokens": 6,
                                             "device": "cpu"})
    model = tr.backend.raw_model.eval()
    with torch.no_grad():
        want = lm_generate(model, with_virtual_ids(model, [tr.tokenizer.encode(p) for p in prompts]), 6,
                           temperature=0.0, eos_id=[tr.tokenizer.eos_id])
    for r, row in zip(got, want.tolist()):
        stop = next((i for i, t in enumerate(row) if t == tr.tokenizer.eos_id), len(row))
        assert r["tokens"][:stop] == row[:stop]
    # the loaded model is the run's (greedy tokens of a 5M model barely depend on the prompt)
    from _common import load_model_and_tokenizer

    loaded, _, _ = load_model_and_tokenizer(str(step), torch.device("cpu"))
    ids = torch.tensor([with_virtual_ids(model, [tr.tokenizer.encode("What is a list?")])[0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], model(ids)[0])
        assert (loaded(ids)[0][:, -1] - loaded(ids[:, 6:])[0][:, -1]).abs().max() > 1e-3  # the table matters
    # launch/evaluate.py scores with the virtual tokens in front, as the run's model does (not the base)
    import evaluate as eval_launcher

    from model.prompt_tuning import prepend

    texts = ["A list holds items in order.", "Say hi to the reader, then stop."]
    texts_file, out = pt_runs["root"] / "texts.jsonl", pt_runs["root"] / "eval.json"
    texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert eval_launcher.main([str(step), "--device", "cpu", "--texts", str(texts_file), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    nats, count, base_nats = 0.0, 0, 0.0
    with torch.no_grad():
        for t in texts:
            ids = [tr.tokenizer.eos_id, *tr.tokenizer.encode(t), tr.tokenizer.eos_id]
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            xv, yv, _ = prepend(model, x, y)
            nats += float(torch.nn.functional.cross_entropy(model(xv)[0][0], yv[0], ignore_index=-100,
                                                            reduction="sum"))
            base_nats += float(torch.nn.functional.cross_entropy(model(x)[0][0], y[0], reduction="sum"))
            count += len(ids) - 1
    assert got["tokens"] == count
    assert abs(got["nats"] - nats) <= 1e-4 * nats
    assert abs(got["nats"] - base_nats) > 1e-3  # without the table the same texts score otherwise
    # the base is checked by the digest prompt_tuning.json records, as a LoRA adapter's is
    import shutil

    from train.checkpoint import CheckpointError
    from train.sft.adapters import load_prompt_tuned

    moved = pt_runs["root"] / "tampered"
    shutil.copytree(step, moved)
    (moved / "prompt_tuning.json").write_text(json.dumps({**cfg, "base_digest": "0" * 64}))
    with pytest.raises(CheckpointError, match="0" * 64):
        load_prompt_tuned(str(moved))


def test_two_process_ddp_prompt_tuning_gives_the_single_process_losses(pt_runs, tmp_path):
    """The README's "single and DDP": 2 DDP ranks x micro-batch 2 against one process x 4, the
    same global batches, with evaluation on: the all-reduced gradient of the virtual-token
    table gives the one-process training and validation losses, and the checkpoint holds the
    table alone as on one process."""
    import subprocess

    from tests.conftest import REPO
    from tests.ports import free_port
    from tests.sft_helpers import SFT_TINY, sft_cfg
    from tests.test_sft_distributed import train_losses
    from train.sft.trainer import SFTTrainer

    data = pt_runs["root"] / "chat0.jsonl"
    common = [*PT, "train.max_steps=4", "checkpoint.every=4", "sft.val_fraction=0.25", "train.eval_every=2"]
    single_dir, ddp_dir = tmp_path / "single", tmp_path / "ddp"
    SFTTrainer(sft_cfg(single_dir, pt_runs["base"], [data], *common)).fit()
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "launch/sft.py", *SFT_TINY, *common,
           f"run_dir={ddp_dir}", f"init_from={pt_runs['base']}", f"sft.paths=[{data}]", "backend=ddp",
           "train.micro_batch_size=2"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    for kind in ("train", "eval"):
        ddp, single = train_losses(ddp_dir, kind), train_losses(single_dir, kind)
        assert sorted(ddp) == sorted(single) and len(single) >= 2, (kind, ddp, single)
        for s in ddp:
            assert ddp[s] == pytest.approx(single[s], rel=1e-5), (kind, s, ddp[s], single[s])
    assert train_losses(ddp_dir)[4] != train_losses(ddp_dir)[1]  # the table trained
    files = sorted(os.listdir(ddp_dir / "checkpoints" / "step_00000004"))
    assert files == sorted(os.listdir(single_dir / "checkpoints" / "step_00000004"))
