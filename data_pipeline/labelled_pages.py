"""Labelled pages for training and measuring the learned quality filter.

The shipped sample's labels (``assets/sample_labels.jsonl``: record id -> kind, language)
are human judgements of what each page is: ``good`` documentation, ``spam``,
``boilerplate``, ``short``, ``symbols``... A quality classifier should learn from such
judgements, not from the heuristic chain it is meant to improve on. ``sample_pages``
joins the labels to the text the extractor gives each record, so the classifier sees what
it will see in the pipeline (after ``html_extract``).

Only pages whose question is the quality of their text are kept: good English pages
(label ``good``) and the junk kinds that are junk by their text (label = the kind: spam,
boilerplate, short stubs, symbol dumps). Left out, because their text is not what is wrong
with them: the adult-URL pages (copies of good documentation pages at blocklisted URLs: the
URL filter's job), the mislabelled-charset pages (French text: extraction and language ID),
the non-English good pages (language ID), the planted exact and near copies of good pages
(dedup), and records with no text after extraction (binary payloads).

``split_by_kind`` cuts any such list into train / validation / test parts, each kind
spread over the three, so that every junk kind is in the held-out part when it has at
least three pages.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from data_pipeline.document import Document

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SAMPLE_WARC = os.path.join(ASSETS, "sample.warc.gz")
SAMPLE_LABELS = os.path.join(ASSETS, "sample_labels.jsonl")
GOOD = "good"
JUNK_KINDS = ("spam", "adult_url", "symbols", "short", "binary", "charset", "pathological", "boilerplate")
TEXT_JUNK_KINDS = ("spam", "symbols", "short", "pathological", "boilerplate")  # junk by their text


def sample_pages(mark_code: bool = True) -> list[dict]:
    """``{"text", "label", "url", "id"}`` per labelled page of the shipped sample, in file order;
    ``label`` is ``good`` or the junk kind."""
    from data_pipeline.extract import HtmlExtractor
    from data_pipeline.readers.warc import WarcReader

    with open(SAMPLE_LABELS, encoding="utf-8") as f:
        labels = {row["record_id"]: row for row in map(json.loads, f)}
    extract = HtmlExtractor(mark_code=mark_code)
    pages = []
    for doc in WarcReader(SAMPLE_WARC):
        lab = labels.get(doc.id)
        if lab is None:
            continue
        if not ((lab["kind"] == GOOD and lab["lang"] == "en") or lab["kind"] in TEXT_JUNK_KINDS):
            continue
        out = extract.process(doc)
        if isinstance(out, Document) and out.text.strip():
            pages.append({"text": out.text, "label": lab["kind"], "url": doc.url, "id": doc.id})
    return pages


def split_by_kind(labels: list[str], seed: int, fractions=(0.5, 0.25, 0.25)) -> tuple[list[int], list[int], list[int]]:
    """Indices of the train, validation and test parts: within each label a seeded shuffle,
    cut by ``fractions``; a label with at least three items has one in each part."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, lab in enumerate(labels):
        by_label[lab].append(i)
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    for lab in sorted(by_label):
        idx = [by_label[lab][j] for j in rng.permutation(len(by_label[lab]))]
        n = len(idx)
        n_val = max(1, int(round(fractions[1] * n))) if n >= 3 else 0
        n_test = max(1, int(round(fractions[2] * n))) if n >= 3 else 0
        n_train = n - n_val - n_test
        parts[0].extend(idx[:n_train])
        parts[1].extend(idx[n_train:n_train + n_val])
        parts[2].extend(idx[n_train + n_val:])
    return tuple(sorted(p) for p in parts)
