"""Train the learned quality filter (data_pipeline/filters/quality_model.py) on labelled pages,
choose its threshold on a validation split and report precision and recall on held-out pages.
A thin command line over data_pipeline/quality_training.py (the split, fit, threshold and
numbers live there).

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
import json
import sys

from data_pipeline.labelled_pages import GOOD, sample_pages
from data_pipeline.quality_training import NeedBothLabels, read_labelled, train_quality_model


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
    try:
        report = train_quality_model(texts, labels, a.positive, a.out, a.threshold, a.epochs, a.seed)
    except NeedBothLabels as e:
        print(f"train_quality_model: {a.data}: {e} ({a.label_key}), {skipped} lines skipped", file=sys.stderr)
        return 2
    report = {**report, "skipped_lines": skipped}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
