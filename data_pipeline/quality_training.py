"""Training and measuring the learned quality filter on labelled pages, as library code:
``launch/train_quality_model.py`` is the command line over it and
``benchmarks/bench_filter_recall.py`` calls it directly.

Labels are people's judgements of pages (the shipped sample's, data_pipeline/labelled_pages.py,
or any JSONL of text + label): one label value means keep, every other is junk and is reported
by name. Split: per label a seeded shuffle cut 50 / 25 / 25 into train, validation and test
(``split_by_kind``). The model is fitted on train with class-balanced weights; the threshold
is chosen on validation (keep no junk page and the most good ones) unless fixed, and stored in
the model file; the test pages give the held-out precision and recall.
"""

from __future__ import annotations

import collections
import json
import os

from data_pipeline.filters.quality_model import QualityModel
from data_pipeline.labelled_pages import split_by_kind


def read_labelled(path: str, text_key: str, label_key: str) -> tuple[list[str], list[str], int]:
    """Texts and labels (as strings) of a JSONL file, and how many lines were skipped (not
    JSON, without either key, or a text that is not a string)."""
    texts, labels, skipped = [], [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
                text, label = row[text_key], row[label_key]
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped += 1
                continue
            if not isinstance(text, str):
                skipped += 1
                continue
            texts.append(text)
            labels.append(str(label))
    return texts, labels, skipped


def evaluate(scores, labels, positive: str, threshold: float) -> dict:
    """Precision and recall of keep at ``threshold``, and what was kept of each other label."""
    kept = [s >= threshold for s in scores]
    tp = sum(k and lab == positive for k, lab in zip(kept, labels))
    n_kept, n_pos = sum(kept), sum(lab == positive for lab in labels)
    junk = collections.Counter(lab for lab in labels if lab != positive)
    junk_kept = collections.Counter(lab for k, lab in zip(kept, labels) if k and lab != positive)
    return {"n": len(labels), "good": n_pos, "precision_keep": tp / max(n_kept, 1),
            "recall_keep": tp / max(n_pos, 1), "junk": dict(junk), "junk_kept": sum(junk_kept.values()),
            "junk_kept_by_label": {lab: junk_kept.get(lab, 0) for lab in sorted(junk)}}


def choose_threshold(scores, labels, positive: str) -> float:
    """Keep no validation junk page and the most good ones: halfway between the highest junk
    score and the lowest good score above it (0.5 if there is no junk or no good page above)."""
    junk = [s for s, lab in zip(scores, labels) if lab != positive]
    if not junk:
        return 0.5
    top = max(junk)
    above = [s for s, lab in zip(scores, labels) if lab == positive and s > top]
    return (top + min(above)) / 2 if above else min(1.0, top + 1e-6)


class NeedBothLabels(ValueError):
    """The labelled pages have only keep or only junk: nothing to learn from."""


def train_quality_model(texts: list[str], labels: list[str], positive: str, out: str,
                        threshold: float | None = None, epochs: int = 20, seed: int = 0) -> dict:
    """Fit a QualityModel on the train split, choose (or fix) its threshold on validation,
    save it to ``out`` and return the report: threshold, validation and held-out numbers and
    the held-out indices (``test_indices``, into ``texts``)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if len({lab == positive for lab in labels}) < 2:
        raise NeedBothLabels(f"need both labels (== {positive!r} and not); got {len(labels)} usable pages")
    train, val, test = split_by_kind(labels, seed)
    model = QualityModel().fit([texts[i] for i in train], [int(labels[i] == positive) for i in train],
                               epochs=epochs, seed=seed, balanced=True)
    val_scores = [model.score(texts[i]) for i in val]
    val_labels = [labels[i] for i in val]
    if threshold is None:
        threshold = choose_threshold(val_scores, val_labels, positive)
    model.threshold = float(threshold)
    model.save(out)
    return {"out": os.path.abspath(out), "train": len(train), "threshold": round(threshold, 6),
            "validation": evaluate(val_scores, val_labels, positive, threshold),
            "held_out": evaluate([model.score(texts[i]) for i in test], [labels[i] for i in test], positive,
                                 threshold),
            "test_indices": test}
