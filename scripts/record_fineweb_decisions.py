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
decisions, the number of words and sentences, a digest of the word list and of the text
C4 leaves, and the versions used. The texts are the sample's pages and a few crafted ones
that trigger the rules the sample does not. Rerun both
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
VERSIONS = os.path.join(OUT, "recorded_with.json")


def words_digest(words) -> str:
    """One digest of a word list (the test compares kiln's spaCy words with it)."""
    return hashlib.sha1("\x00".join(words).encode()).hexdigest()


def crafted_texts() -> dict[str, str]:
    """Texts that trigger the rules and corner cases the sample does not: every Gopher, C4
    and FineWeb rule at least once, other line separators, and n-grams that repeat only
    when their words are joined with nothing."""
    s = "The river runs past the old stone bridge, and the town has grown around it with care."
    prose = " ".join([s.replace("river", f"river{i}") for i in range(12)])
    lines = [f"Line {i} tells of the river and the stone, with care and that." for i in range(20)]
    return {
        "long_doc": "word " * 100_001,
        "short_words": " ".join(["a an it of to be is"] * 20) + " the and with that.",
        "long_words": " ".join(["internationalisation characteristically"] * 40) + " the and with that.",
        "dash_bullets": "\n".join("- " + ln for ln in lines),
        "dot_bullets": "\n".join("• " + ln for ln in lines),
        "end_ellipsis": "\n".join(ln[:-1] + ("..." if i % 2 else "…") for i, ln in enumerate(lines)),
        "ellipsis_tokens": prose + " ..." * 30,
        "hashes": prose + " #tag" * 30,
        "dup_line_chars": "\n".join(lines[:10] + ["The same long line about the river and the stone comes back. " * 3] * 4),
        "dup_paragraphs": "\n\n".join(lines[:4] + [lines[5]] * 3),
        "dup_para_chars": "\n\n".join([prose] + ["A paragraph that repeats, about the river and the stone. " * 4] * 3),
        "list_like": "\n".join(f"Item {i} the end." for i in range(40)),
        "list_ratio": "\n".join(f"Internationalisation{i} characteristically." for i in range(30)),
        "short_lines": "\n".join([ln[:25] for ln in lines] + lines[:5]),
        "no_punctuation": "\n".join(ln.rstrip(".") for ln in lines),
        "crlf": "\r\n".join(lines),
        "cr": "\r".join(lines),
        "line_separator": "\u2028".join(lines),
        "javascript_policy_citations": "\n".join(
            lines[:8] + ["Please enable JavaScript to see the river.", "This site uses cookies, and that is fine.",
                         "The stone bridge was built in 1820.[1] It was mended later.[citation needed]"]),
        "lorem": "\n".join(lines[:8] + ["Lorem ipsum dolor sit amet, consectetur adipiscing elit."]),
        "curly": "\n".join(lines[:8] + ["The config is {\"river\": 1} and that is all."]),
        # "abcdefgh ij klm nop qrs" repeats as "abcdefghi jklm nopq r s" (the same 19 letters)
        "joined_repeat": "x y z w abcdefgh ij klm nop qrs u v abcdefghi jklm nopq r s",
        "capital_stop_words": " ".join(w.capitalize() for w in prose.split()),
        "punctuation_only": "... ,,, !!! ??? --- ;;; ::: ((( )))",
        "whitespace_only": "   \n\n \t ",
        "unicode_terminators": "\n".join(ln[:-1] + "。" for ln in lines),
    }


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
        for name, text in crafted_texts().items():
            f.write(json.dumps({"id": f"crafted:{name}", "url": "", "text": text}, ensure_ascii=False) + "\n")
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
            c4_doc = Document(text=text, id=rec["id"])
            c4_kept = decide(chain[2][1], c4_doc) is None
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
                "c4_text_sha1": hashlib.sha1(c4_doc.text.encode()).hexdigest() if c4_kept else None,
            }) + "\n")
            n += 1
    with open(VERSIONS, "w") as f:
        json.dump({"datatrove": version("datatrove"), "spacy": version("spacy")}, f)
        f.write("\n")
    print(f"{n} decisions of datatrove {version('datatrove')}, spaCy {version('spacy')} -> {DECISIONS}")


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "texts":
        record_texts()
    elif what == "decisions":
        record_decisions()
    else:
        sys.exit("usage: record_fineweb_decisions.py texts | decisions")
