"""Train the learned quality filter (data_pipeline/filters/quality_model.py) on labelled pages
and report its precision and recall on a held-out split.

    python launch/train_quality_model.py --out quality.safetensors
    python launch/train_quality_model.py --data my_labels.jsonl --label-key decision --positive keep \\
        --out quality.safetensors
    python launch/prepare_data.py --output-dir data/prepared data.quality_model.enabled=true \\
        data.quality_model.model_path=quality.safetensors data.quality_model.threshold=0.5

Input: JSONL with a text and a label per line (default: the shipped
data_pipeline/assets/sft/pipeline_keep.jsonl, the keep/remove decisions of the default chain
on the sample, 326 pages). A line without the keys is skipped and counted. The held-out
split is a seeded random ``--val-fraction`` of the lines; the model is then retrained on
all of them unless --no-refit.
"""

import _bootstrap  # noqa: F401

import argparse
import json
import os
import sys

import numpy as np

from data_pipeline.filters.quality_model import QualityModel

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_pipeline", "assets",
                            "sft", "pipeline_keep.jsonl")


def read_labelled(path: str, text_key: str, label_key: str, positive: str) -> tuple[list[str], list[int], int]:
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
            labels.append(int(str(label) == positive))
    return texts, labels, skipped


def evaluate(model: QualityModel, texts, labels, threshold: float) -> dict:
    pred = np.asarray([model.score(t) >= threshold for t in texts])
    y = np.asarray(labels, dtype=bool)
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {"n": len(y), "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "precision_keep": tp / max(tp + fp, 1), "recall_keep": tp / max(tp + fn, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--text-key", default="text")
    ap.add_argument("--label-key", default="label")
    ap.add_argument("--positive", default="keep", help="the label value that means keep")
    ap.add_argument("--out", required=True, help="model file (safetensors)")
    ap.add_argument("--val-fraction", type=float, default=0.25)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-refit", action="store_true", help="keep the model trained on the training split only")
    a = ap.parse_args(argv)
    if not 0.0 < a.val_fraction < 1.0:
        ap.error(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    texts, labels, skipped = read_labelled(a.data, a.text_key, a.label_key, a.positive)
    if len(set(labels)) < 2:
        print(f"train_quality_model: {a.data}: need both labels ({a.label_key} == {a.positive!r} and not); "
              f"got {len(labels)} usable lines, {skipped} skipped", file=sys.stderr)
        return 2
    order = np.random.default_rng(a.seed).permutation(len(texts))
    n_val = max(1, int(round(a.val_fraction * len(texts))))
    val, train = order[:n_val], order[n_val:]
    model = QualityModel().fit([texts[i] for i in train], [labels[i] for i in train], epochs=a.epochs, seed=a.seed)
    held_out = evaluate(model, [texts[i] for i in val], [labels[i] for i in val], a.threshold)
    if not a.no_refit:
        model = QualityModel().fit(texts, labels, epochs=a.epochs, seed=a.seed)
    model.save(a.out)
    print(json.dumps({"out": os.path.abspath(a.out), "train": len(train), "skipped_lines": skipped,
                      "threshold": a.threshold, "held_out": held_out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
