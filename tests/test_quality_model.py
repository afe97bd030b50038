"""The learned quality filter: trained by its command on the shipped labelled pages (people's
judgements, not the heuristics' decisions), its threshold chosen on validation pages, its
held-out numbers what the saved model scores and meeting the target (good-page recall >=
95%, no junk kind kept); as a pipeline step it drops by score with the statistic in the
audit, after the heuristics or in their place."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.document import Document
from data_pipeline.filters.quality_model import QualityModel, QualityModelFilter
from data_pipeline.labelled_pages import GOOD, TEXT_JUNK_KINDS, sample_pages
from tests.conftest import REPO


def train(out: str, *extra) -> dict:
    p = subprocess.run([sys.executable, "launch/train_quality_model.py", "--out", out, *extra], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One training run on the shipped labels, and the labelled pages it was given."""
    out = str(tmp_path_factory.mktemp("qm") / "quality.safetensors")
    return train(out), out, sample_pages()


def test_the_shipped_labels_are_judgements_of_every_text_junk_kind(trained):
    _, _, pages = trained
    labels = [p["label"] for p in pages]
    assert labels.count(GOOD) == 228 and set(labels) - {GOOD} == {"spam", "boilerplate", "short", "symbols"}
    assert set(labels) - {GOOD} <= set(TEXT_JUNK_KINDS)


def test_held_out_numbers_are_what_the_saved_model_scores_and_meet_the_target(trained):
    said, path, pages = trained
    model = QualityModel.load(path)
    assert model.threshold == pytest.approx(said["threshold"], abs=1e-6)
    test = [pages[i] for i in said["test_indices"]]
    kept = np.array([model.score(p["text"]) >= model.threshold for p in test])
    good = np.array([p["label"] == GOOD for p in test])
    h = said["held_out"]
    assert h["n"] == len(test) and h["good"] == int(good.sum()) >= 50
    assert h["recall_keep"] == pytest.approx((kept & good).sum() / good.sum())
    assert h["precision_keep"] == pytest.approx((kept & good).sum() / max(kept.sum(), 1))
    assert h["junk_kept"] == int((kept & ~good).sum())
    # The target, on pages the model neither trained on nor chose its threshold on:
    assert set(h["junk"]) == {"spam", "boilerplate", "short", "symbols"}  # every kind is tested
    assert h["recall_keep"] >= 0.95 and h["junk_kept"] == 0
    assert said["validation"]["junk_kept"] == 0  # the threshold was chosen to keep no validation junk


def test_the_step_uses_the_models_threshold_and_records_its_score(trained):
    said, path, pages = trained
    step = QualityModelFilter(model_path=path)  # threshold null: the model's own
    assert step.threshold == pytest.approx(said["threshold"], abs=1e-6)
    spam = next(p for p in pages if p["label"] == "spam")
    assert step.run_one(Document(id="s", text=spam["text"])) is None
    assert step.stats.removed_by_reason["quality_model_low_score"] == 1
    stat, limit = step.decision
    assert stat < limit == step.threshold
    good = next(p for p in pages if p["label"] == GOOD)
    out = step.run_one(Document(id="g", text=good["text"]))
    assert out is not None and out.metadata["quality_score"] >= step.threshold
    assert QualityModelFilter(model_path=path, threshold=1.0).run_one(Document(id="g", text=good["text"])) is None


def test_the_model_runs_after_the_heuristics_or_in_their_place(trained):
    from data_pipeline.pipeline import HEURISTICS, build_steps
    from tests.conftest import compose

    _, path, _ = trained
    qm = ["data.quality_model.enabled=true", f"data.quality_model.model_path={path}"]
    after = [s.name for s in build_steps(compose(qm).data)]
    assert after.index("quality_model") > max(after.index(h) for h in HEURISTICS if h in after)
    assert {"gopher_quality", "c4_quality", "fineweb_quality"} <= set(after)
    instead = [s.name for s in build_steps(compose(qm + ["data.quality_model.replace_heuristics=true"]).data)]
    assert not set(HEURISTICS) & set(instead)
    assert instead == ["url_filter", "html_extract", "langid", "quality_model", "exact_dedup", "minhash_dedup", "pii"]


def test_own_labels_train_and_bad_inputs_are_counted_or_refused(trained, tmp_path):
    _, _, pages = trained
    labelled = tmp_path / "labels.jsonl"
    rows = [{"body": p["text"], "verdict": "yes" if p["label"] == GOOD else "no"} for p in pages[::3]]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" + '{"body": 3, "verdict": "no"}\n')
    said = train(str(tmp_path / "own.safetensors"), "--data", str(labelled), "--text-key", "body",
                 "--label-key", "verdict", "--positive", "yes")
    assert said["skipped_lines"] == 2 and set(said["held_out"]["junk"]) == {"no"}
    one_label = tmp_path / "one.jsonl"
    one_label.write_text(json.dumps({"text": "a page", "label": "good"}) + "\n")
    p = subprocess.run([sys.executable, "launch/train_quality_model.py", "--data", str(one_label), "--out",
                        str(tmp_path / "x.safetensors")], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "need both labels" in p.stderr
    from safetensors.numpy import save_file

    save_file({"weights": np.zeros(3, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a kiln quality model"):
        QualityModel.load(str(tmp_path / "other.safetensors"))


def test_quality_model_config_errors_name_the_key(trained):
    from tests.conftest import compose
    from train.config import ConfigError, validate

    _, path, _ = trained
    with pytest.raises(ConfigError, match="data.quality_model.model_path"):
        validate(compose(["data.quality_model.enabled=true"]))
    with pytest.raises(ConfigError, match="data.quality_model.threshold"):
        validate(compose(["data.quality_model.enabled=true", f"data.quality_model.model_path={path}",
                          "data.quality_model.threshold=1.5"]))
