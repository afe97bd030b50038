"""Train the learned quality filter (data_pipeline/filters/quality_model.py) on labelled pages,
choose its threshold on a validation split and report precision and recall on held-out pages.

    python launch/train_quality_model.py --out quality.safetensors          # the shipped labels
    python launch/train_quality_model.py --data my_labels.jsonl --label-key label --positive good \\
        --out quality.safetensors                                           # your own labels
    python launch/prepare_data.py --output-dir data/prepared data.quality_model.enabled=true \\
        data.quality_model.model_path=quality.safetensors                    # after the heuristics
    ... data.quality_model.replace_heuristics=true                          # in their place

Input: the shipped sample's labelled pages (``--data sample``, the default:
data_pipeline/labelled_pages.py, 228 good English documentation pages and 20 pages of
text junk: spam, boilerplate, "coming soon" stubs, symbol dumps), or a JSONL file with a
text and a label per line; ``--positive`` names the label that means keep (every other
label is junk, and is reported by name). A line without the keys is skipped and counted.

Split: per label a seeded shuffle cut 50 / 25 / 25 into train, validation and test
(``--seed``). The model is fitted on train with class-balanced weights; the threshold is
the one that keeps no validation junk page and the most validation good pages, halfway
between the highest-scoring junk page and the next good page above it (``--threshold``
fixes it instead). The model file stores it (``data.quality_model.threshold=null`` uses
it). Printed (one JSON line): the threshold, the validation numbers, and on the test pages
precision and recall of keep and the junk kept per label.
"""

import _bootstrap  # noqa: F401

import argparse
import collections
import json
import os
import sys

from data_pipeline.filters.quality_model import QualityModel
from data_pipeline.labelled_pages import GOOD, sample_pages, split_by_kind


def read_labelled(path: str, text_key: str, label_key: str) -> tuple[list[str], list[str], int]:
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sample", help="'sample' (the shipped labelled pages) or a JSONL file")
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--label-key", default="label")
    ap.add_argument("--positive", default=GOOD, help="the label value that means keep")
    ap.add_argument("--out", required=True, help="model file (safetensors)")
    ap.add_argument("--threshold", type=float, default=None, help="fix the threshold instead of choosing it")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threshold is not None and not 0.0 <= a.threshold <= 1.0:
        ap.error(f"--threshold must be in [0, 1], got {a.threshold}")
    if a.data == "sample":
        pages = sample_pages()
        texts, labels, skipped = [p["text"] for p in pages], [p["label"] for p in pages], 0
    else:
        texts, labels, skipped = read_labelled(a.data, a.text_key, a.label_key)
    if len({lab == a.positive for lab in labels}) < 2:
        print(f"train_quality_model: {a.data}: need both labels ({a.label_key} == {a.positive!r} and not); "
              f"got {len(labels)} usable lines, {skipped} skipped", file=sys.stderr)
        return 2
    train, val, test = split_by_kind(labels, a.seed)
    model = QualityModel().fit([texts[i] for i in train], [int(labels[i] == a.positive) for i in train],
                               epochs=a.epochs, seed=a.seed, balanced=True)
    val_scores = [model.score(texts[i]) for i in val]
    val_labels = [labels[i] for i in val]
    threshold = a.threshold if a.threshold is not None else choose_threshold(val_scores, val_labels, a.positive)
    model.threshold = float(threshold)
    model.save(a.out)
    report = {"out": os.path.abspath(a.out), "train": len(train), "skipped_lines": skipped,
              "threshold": round(threshold, 6), "validation": evaluate(val_scores, val_labels, a.positive, threshold),
              "held_out": evaluate([model.score(texts[i]) for i in test], [labels[i] for i in test], a.positive,
                                   threshold),
              "test_indices": test}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
