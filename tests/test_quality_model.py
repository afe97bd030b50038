"""The learned quality filter: trained by its command on the shipped keep/remove set, its
held-out numbers are what the saved model scores, and as a pipeline step it drops by
score with the statistic in the audit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.document import Document
from data_pipeline.filters.quality_model import QualityModel, QualityModelFilter
from tests.conftest import REPO

DATA = os.path.join(REPO, "data_pipeline", "assets", "sft", "pipeline_keep.jsonl")


def train(tmp_path, *extra) -> tuple[dict, str]:
    out = str(tmp_path / "quality.safetensors")
    p = subprocess.run([sys.executable, "launch/train_quality_model.py", "--out", out, *extra], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), out


def test_held_out_precision_and_recall_are_what_the_saved_model_scores(tmp_path):
    said, path = train(tmp_path, "--no-refit", "--seed", "3")
    rows = [json.loads(line) for line in open(DATA)]
    order = np.random.default_rng(3).permutation(len(rows))
    val = [rows[i] for i in order[: said["held_out"]["n"]]]
    model = QualityModel.load(path)
    pred = np.array([model.score(r["text"]) >= 0.5 for r in val])
    y = np.array([r["label"] == "keep" for r in val])
    tp = int((pred & y).sum())
    assert said["held_out"]["precision_keep"] == pytest.approx(tp / max(int(pred.sum()), 1))
    assert said["held_out"]["recall_keep"] == pytest.approx(tp / int(y.sum()))
    majority = max(y.mean(), 1 - y.mean())
    assert said["held_out"]["accuracy"] > majority + 0.1  # it learned more than the label balance


def test_the_step_drops_by_score_and_records_it(tmp_path):
    _, path = train(tmp_path)
    step = QualityModelFilter(model_path=path, threshold=0.5)
    rows = [json.loads(line) for line in open(DATA)]
    keep = max((r for r in rows if r["label"] == "keep"), key=lambda r: step.model.score(r["text"]))
    out = step.run_one(Document(id="k", text=keep["text"]))
    assert out is not None and out.metadata["quality_score"] >= 0.5
    strict = QualityModelFilter(model_path=path, threshold=1.0)  # nothing scores 1.0: everything goes
    assert strict.run_one(Document(id="k", text=keep["text"])) is None
    assert strict.stats.removed_by_reason["quality_model_low_score"] == 1
    assert strict.decision[1] == 1.0 and strict.decision[0] < 1.0


def test_bad_inputs_are_counted_or_refused_with_a_clear_message(tmp_path):
    labelled = tmp_path / "labels.jsonl"
    good = [json.loads(line) for line in open(DATA)][:40]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in good) + "{not json\n" + '{"text": 3}\n')
    said, _ = train(tmp_path, "--data", str(labelled))
    assert said["skipped_lines"] == 2
    one_label = tmp_path / "one.jsonl"
    one_label.write_text(json.dumps({"text": "a page", "label": "keep"}) + "\n")
    p = subprocess.run([sys.executable, "launch/train_quality_model.py", "--data", str(one_label), "--out",
                        str(tmp_path / "x.safetensors")], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "need both labels" in p.stderr
    from safetensors.numpy import save_file

    save_file({"weights": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a kiln quality model"):
        QualityModel.load(str(tmp_path / "other.safetensors"))
    from tests.conftest import compose
    from train.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.quality_model.model_path"):
        validate(compose(["data.quality_model.enabled=true"]))
