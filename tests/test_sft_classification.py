"""Classification fine-tuning: metrics on known splits, the head on the last real token, class
weights, a real run with held-out accuracy / macro-F1, and the shipped keep/remove dataset."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from model.classifier import TransformerClassifier
from model.llama import ModelConfig
from tests.sft_helpers import sft_cfg, tiny_checkpoint, write_jsonl
from train.sft.metrics import accuracy, classification_report, macro_f1, per_class_f1


def test_metrics_on_a_hand_computed_split():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 0, 2]
    assert accuracy(labels, preds) == pytest.approx(4 / 6)
    assert per_class_f1(labels, preds, 3) == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert macro_f1(labels, preds, 3) == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    majority = [0] * 6  # accuracy 0.5, but macro-F1 exposes it
    assert accuracy(labels, majority) == 0.5 and macro_f1(labels, majority, 3) == pytest.approx((2 / 3) / 3)
    rep = classification_report(labels, preds, ["a", "b", "c"])
    assert rep["confusion"] == [[2, 1, 0], [1, 1, 0], [0, 0, 1]] and rep["n"] == 6


def test_head_reads_the_last_real_token_and_class_weights_weigh_the_loss():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=2, vocab_size=64, max_seq_len=32)
    model = TransformerClassifier(cfg, 2, class_weights=[1.0, 3.0]).eval()
    x = torch.randint(4, 64, (2, 6))
    padded = torch.cat([x, torch.full((2, 3), 3)], dim=1)  # right padding (PAD = 3)
    y = torch.tensor([0, 1])
    logits, loss = model(padded, y, last_index=torch.tensor([5, 5]))
    torch.testing.assert_close(logits, model(x)[0])  # padding after the last token changes nothing
    ce = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(loss, (ce[0] + 3 * ce[1]) / 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


def topic_rows(n, offset=0):
    py = "python function module class import list dict".split()
    deb = "debian package apt install kernel mirror repository".split()
    rows = []
    for i in range(offset, offset + n):
        words, label = (py, "python") if i % 2 else (deb, "debian")
        rows.append({"text": " ".join(words[(i + k) % len(words)] for k in range(5)), "label": label})
    return rows


def test_classification_run_learns_and_reports_held_out_metrics(tmp_path, base):
    from train.sft.trainer import SFTTrainer

    train = write_jsonl(tmp_path / "train.jsonl", topic_rows(48))
    val = write_jsonl(tmp_path / "val.jsonl", topic_rows(14, offset=100))
    cfg = sft_cfg(tmp_path / "run", base, [train], "task=classification", f"sft.val_paths=[{val}]",
                  "train.max_steps=16", "train.eval_every=8", "train.micro_batch_size=8")
    tr = SFTTrainer(cfg)
    res = tr.fit()
    c = res["classification"]
    assert c["n"] == 14 and c["classes"] == ["debian", "python"]
    assert c["accuracy"] == 1.0 and c["macro_f1"] == 1.0
    assert res["val_losses"][16] < res["val_losses"][0]
    # The reported numbers are those of the model's own predictions on the held-out file.
    model = tr.backend.raw_model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for b in tr.val_batches:
            preds += model(b["input"], last_index=b["model_kwargs"]["last_index"])[0].argmax(-1).tolist()
            labels += b["target"].tolist()
    assert classification_report(labels, preds, c["classes"])["accuracy"] == c["accuracy"]
    saved = json.loads((tmp_path / "run" / "classification_metrics.json").read_text())
    assert saved["macro_f1"] == c["macro_f1"] and saved["step"] == 16
    assert json.loads((tmp_path / "run" / "checkpoints" / "step_00000016" / "labels.json").read_text())[
        "labels"] == ["debian", "python"]


def test_shipped_keep_remove_set_comes_from_the_pipeline_decisions():
    from train.config import ASSETS

    rows = [json.loads(line) for line in open(os.path.join(ASSETS, "sft", "pipeline_keep.jsonl"))]
    with open(os.path.join(ASSETS, "sample_labels.jsonl")) as f:
        ids = {json.loads(line)["record_id"] for line in f}
    assert {r["label"] for r in rows} == {"keep", "remove"} and len(rows) >= 300
    assert all(r["record_id"] in ids for r in rows)
    assert all((r["label"] == "remove") == (r["removed_by"] is not None) for r in rows)
    assert {r["removed_by"] for r in rows if r["kind"] == "adult_url"} == {"url_filter"}
