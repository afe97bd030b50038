"""Record the FineWeb recipe's decisions on shipped text, for tests/test_fineweb_conformance.py.

The conformance test must not need datatrove, so its reference is recorded once, here, in two
steps (datatrove need not share kiln's environment):

    # 1. kiln's environment: the text of every page of the embedded sample, as kiln extracts it
    python scripts/record_fineweb_decisions.py texts
    # 2. any environment with datatrove and spaCy (pip install datatrove spacy): its decisions
    python scripts/record_fineweb_decisions.py decisions

Step 2 runs the recipe's four text filters with its settings (datatrove's FineWeb example:
GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
FineWebQualityFilter(), English) over each text, in order and each alone, and records the
decisions, the number of words and sentences, and a digest of the word list. Rerun both
steps after changing the extractor or the sample.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "tests", "data", "fineweb_conformance")
TEXTS = os.path.join(OUT, "texts.jsonl.gz")
DECISIONS = os.path.join(OUT, "datatrove_decisions.jsonl.gz")


def words_digest(words) -> str:
    """One digest of a word list (the test compares kiln's spaCy words with it)."""
    return hashlib.sha1("\x00".join(words).encode()).hexdigest()


def record_texts() -> None:
    sys.path.insert(0, REPO)
    from data_pipeline.extract import HtmlExtractor
    from data_pipeline.readers import WarcReader

    extract = HtmlExtractor()
    os.makedirs(OUT, exist_ok=True)
    n = 0
    with gzip.open(TEXTS, "wt", encoding="utf-8") as f:
        for doc in WarcReader([os.path.join(REPO, "data_pipeline", "assets", "sample.warc.gz")], source="web"):
            out = extract.process(doc)
            if out is None or isinstance(out, str):
                continue
            f.write(json.dumps({"id": out.id, "url": out.url, "text": out.text}, ensure_ascii=False) + "\n")
            n += 1
    print(f"{n} texts -> {TEXTS}")


def record_decisions() -> None:
    from importlib.metadata import version

    from datatrove.data import Document
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.utils.text import split_into_words
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    chain = [("gopher_repetition", GopherRepetitionFilter()), ("gopher_quality", GopherQualityFilter()),
             ("c4_quality", C4QualityFilter(filter_no_terminal_punct=False)),
             ("fineweb_quality", FineWebQualityFilter())]
    sentences = load_word_tokenizer("en")

    def decide(step, doc) -> str | None:
        out = step.filter(doc)
        if out is True:
            return None
        return out[1] if isinstance(out, tuple) else "dropped"

    n = 0
    with gzip.open(TEXTS, "rt", encoding="utf-8") as fin, gzip.open(DECISIONS, "wt", encoding="utf-8") as fout:
        for line in fin:
            rec = json.loads(line)
            text = rec["text"]
            alone = {name: decide(step, Document(text=text, id=rec["id"])) for name, step in chain}
            doc, decision = Document(text=text, id=rec["id"]), None
            for name, step in chain:  # in order: C4 edits the text the FineWeb rules then see
                why = decide(step, doc)
                if why is not None:
                    decision = f"{name}:{why}"
                    break
            words = split_into_words(text)
            fout.write(json.dumps({
                "id": rec["id"], "decision": decision or "keep", "alone": alone, "n_words": len(words),
                "words_sha1": words_digest(words), "n_sentences": len(sentences.span_tokenize(text)),
            }) + "\n")
            n += 1
    print(f"{n} decisions of datatrove {version('datatrove')}, spaCy {version('spacy')} -> {DECISIONS}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "texts":
        record_texts()
    elif what == "decisions":
        record_decisions()
    else:
        sys.exit("usage: record_fineweb_decisions.py texts | decisions")
