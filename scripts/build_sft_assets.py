"""Build the fine-tuning datasets shipped in ``data_pipeline/assets/sft/`` (and the
lm-evaluation-harness documents in ``data_pipeline/assets/lm_eval/``) from the sample WARC.

    python scripts/build_sft_assets.py            # rewrites the files, deterministic

Why derived from ``sample.warc.gz``: the embedded defaults must be real text, run offline and
carry a clear licence. Both files are derived from the Python 3.11 documentation pages in
the WARC (Python Software Foundation License Version 2) and, for the classification set,
also from the Debian Reference pages (GPL-2+) and the public-domain junk records.

- ``python_qa.jsonl`` (alpaca format: instruction / input / output): for every documented
  object of the Python docs pages (``<dl class="py function|method|class|...">``) the
  question "What does `json.dump()` do?" answered with the first sentences of its
  description, plus "What is the `json` module for?" answered from each module page's
  first paragraph. At most ``PER_PAGE`` objects per page so no module dominates.
- ``pipeline_keep.jsonl`` (text / label): every record with extractable text, labelled
  ``keep`` or ``remove`` by the real decision of the embedded data pipeline
  (conf/data/sample.yaml, every step), with the step that removed it and the labels-file
  ``kind`` (``sample_labels.jsonl``) as metadata. The text is the URL line plus the start
  of the extracted text: the URL filter decides on the URL alone.
- ``python_prefs.jsonl`` (prompt / chosen / rejected): every question of ``python_qa.jsonl``
  with its own answer as ``chosen`` and, as ``rejected``, the same answer with its words
  shuffled (seeded): the same vocabulary, so only fluency and sense separate them. The
  embedded default for ``launch/dpo.py``.
- ``lm_eval/python_docs.jsonl`` (text / source): the module descriptions of
  ``python_qa.jsonl`` (the answers to "What is the `json` module for?"), short prose
  documents that fit in one window of the tiny model, for the harness task beside it.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ASSETS = os.path.join(REPO, "data_pipeline", "assets")
WARC = os.path.join(ASSETS, "sample.warc.gz")
OUT_DIR = os.path.join(ASSETS, "sft")
PER_PAGE = 4
MAX_ANSWER_CHARS = 320
CLS_TEXT_CHARS = 700

_DT = re.compile(r'<dl class="py (function|method|class|exception|attribute|data|classmethod|staticmethod)">\s*'
                 r'<dt class="sig sig-object py" id="([^"]+)">(.*?)</dt>\s*<dd>(.*?)</dd>', re.S)
_P = re.compile(r"<p>(.*?)</p>", re.S)
_H1 = re.compile(r'<section id="module-([\w.]+)">.*?<h1>(.*?)</h1>(.*?)</section>', re.S)
_TAG = re.compile(r"<[^>]+>")
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(`])")


def clean(fragment: str) -> str:
    text = html.unescape(_TAG.sub("", fragment))
    return re.sub(r"\s+", " ", text).strip().replace("¶", "")


def first_sentences(paragraph: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """Whole sentences from the start, at least one, while under ``limit`` characters."""
    out = ""
    for s in _SENT_END.split(paragraph):
        if out and len(out) + 1 + len(s) > limit:
            break
        out = f"{out} {s}".strip()
    return out


def question(kind: str, name: str) -> str:
    if kind in ("function", "method", "classmethod", "staticmethod"):
        return f"What does `{name}()` do?"
    if kind == "exception":
        return f"What is the `{name}` exception?"
    if kind == "class":
        return f"What is the `{name}` class?"
    return f"What is `{name}`?"


def python_pages():
    from warcio.archiveiterator import ArchiveIterator

    with open(WARC, "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type != "response":
                continue
            url = rec.rec_headers.get_header("WARC-Target-URI") or ""
            body = rec.content_stream().read()
            if url.startswith("https://docs.python.org/3.11/library/"):
                yield url, body.decode("utf-8", "replace")


def build_qa() -> list[dict]:
    pairs, seen = [], set()
    for url, page in sorted(python_pages()):
        m = _H1.search(page)
        if m:
            module = m.group(1)
            paras = [clean(p) for p in _P.findall(m.group(3)[:20000])]
            paras = [p for p in paras if len(p) > 40 and not p.startswith(("Source code:", "Deprecated", "Availability"))]
            answer = first_sentences(paras[0]) if paras else ""
            if answer.endswith("."):
                pairs.append({"instruction": f"What is the `{module}` module for?", "input": "",
                              "output": answer, "source": url})
        taken = 0
        for kind, name, _sig, body in _DT.findall(page):
            if taken >= PER_PAGE or name in seen:
                continue
            p = _P.search(body)
            answer = first_sentences(clean(p.group(1))) if p else ""
            if len(answer) < 25 or not answer.endswith((".", ")")):
                continue
            seen.add(name)
            taken += 1
            pairs.append({"instruction": question(kind, name), "input": "", "output": answer, "source": url})
    return pairs


def build_classification() -> list[dict]:
    """Every record's extracted text, labelled by the embedded pipeline's keep/remove decision."""
    from hydra import compose, initialize_config_dir

    from data_pipeline.audit import RemovedBy
    from data_pipeline.extract import HtmlExtractor
    from data_pipeline.pipeline import build_reader, documents
    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        cfg = compose(config_name="pretrain").data
    stream = documents(cfg)
    removed_by = RemovedBy().watch(stream).step
    kept = {doc.id for doc in stream}
    with open(os.path.join(ASSETS, "sample_labels.jsonl"), encoding="utf-8") as f:
        kinds = {r["record_id"]: r["kind"] for r in map(json.loads, f)}
    extractor = HtmlExtractor()
    rows = []
    for doc in build_reader(cfg.sources[0]):
        out = extractor.run_one(doc)
        if out is None or not out.text.strip():
            continue  # no text to classify (binary payload, broken charset, empty body)
        label = "keep" if doc.id in kept else "remove"
        rows.append({"text": f"{doc.url}\n{out.text.strip()[:CLS_TEXT_CHARS]}", "label": label,
                     "removed_by": removed_by.get(doc.id), "kind": kinds.get(doc.id), "record_id": doc.id})
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_preferences(qa: list[dict], seed: int = 7) -> list[dict]:
    """Each question's own answer is ``chosen``; ``rejected`` is that answer with its words in a
    seeded random order: the same words, so only fluency and sense tell them apart (another
    question's answer as ``rejected`` would make every answer both preferred and dispreferred,
    which a small model cannot separate from the question)."""
    import random

    rng = random.Random(seed)
    rows = []
    for q in qa:
        words = q["output"].split()
        shuffled = words[:]
        while len(words) > 1 and shuffled == words:
            rng.shuffle(shuffled)
        if shuffled == words:
            continue
        rows.append({"prompt": q["instruction"], "chosen": q["output"], "rejected": " ".join(shuffled),
                     "source": q.get("source", "")})
    return rows


def build_lm_eval_docs(qa: list[dict]) -> list[dict]:
    return [{"text": r["output"], "source": r["source"]} for r in qa
            if r["instruction"].startswith("What is the `") and r["instruction"].endswith("` module for?")]


def main() -> None:
    qa = build_qa()
    write_jsonl(os.path.join(OUT_DIR, "python_qa.jsonl"), qa)
    write_jsonl(os.path.join(OUT_DIR, "python_prefs.jsonl"), build_preferences(qa))
    docs = build_lm_eval_docs(qa)
    write_jsonl(os.path.join(ASSETS, "lm_eval", "python_docs.jsonl"), docs)
    print(f"lm_eval/python_docs.jsonl: {len(docs)} documents")
    cls = build_classification()
    write_jsonl(os.path.join(OUT_DIR, "pipeline_keep.jsonl"), cls)
    n_keep = sum(r["label"] == "keep" for r in cls)
    print(f"python_qa.jsonl: {len(qa)} pairs; pipeline_keep.jsonl: {len(cls)} documents "
          f"({n_keep} keep, {len(cls) - n_keep} remove) -> {OUT_DIR}")


if __name__ == "__main__":
    main()
