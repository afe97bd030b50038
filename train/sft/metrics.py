"""Classification metrics on a held-out split: accuracy and macro-F1 (plain Python, tested on
hand-computed splits). Macro-F1 averages per-class F1 with equal weight, so a classifier
that always predicts the majority class scores low even when accuracy looks fine."""

from __future__ import annotations


def confusion(labels: list[int], preds: list[int], num_classes: int) -> list[list[int]]:
    """m[true][pred] counts."""
    m = [[0] * num_classes for _ in range(num_classes)]
    for y, p in zip(labels, preds):
        m[y][p] += 1
    return m


def accuracy(labels: list[int], preds: list[int]) -> float:
    if not labels:
        raise ValueError("accuracy of an empty split")
    return sum(int(y == p) for y, p in zip(labels, preds)) / len(labels)


def per_class_f1(labels: list[int], preds: list[int], num_classes: int) -> list[float]:
    """F1 of each class; a class never predicted and never present counts as 0 (and such a
    class should not be configured)."""
    m = confusion(labels, preds, num_classes)
    out = []
    for c in range(num_classes):
        tp = m[c][c]
        fp = sum(m[r][c] for r in range(num_classes)) - tp
        fn = sum(m[c]) - tp
        out.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return out


def macro_f1(labels: list[int], preds: list[int], num_classes: int) -> float:
    f1 = per_class_f1(labels, preds, num_classes)
    return sum(f1) / num_classes


def classification_report(labels: list[int], preds: list[int], names: list[str]) -> dict:
    k = len(names)
    return {"n": len(labels), "accuracy": accuracy(labels, preds), "macro_f1": macro_f1(labels, preds, k),
            "f1": dict(zip(names, per_class_f1(labels, preds, k))), "confusion": confusion(labels, preds, k),
            "classes": list(names)}
