"""Text helpers shared by the filters: one word tokenizer so every heuristic counts the same words.

The published heuristics (Gopher, C4, FineWeb via datatrove) count words with NLTK's
``word_tokenize``; kiln does not depend on NLTK, so words are runs of word characters
(apostrophes inside words kept) and every other non-space character is its own token.
That matches NLTK on ordinary prose to within a few percent and never needs a download.
"""

from __future__ import annotations

import functools
import re
import string

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
PUNCTUATION = set(string.punctuation)
# Lines ending with one of these count as sentences / prose (C4's END_PUNCTUATION).
END_PUNCTUATION = (".", "?", "!", '"', "'")


@functools.lru_cache(maxsize=4)
def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD_RE.findall(text))


def words_of(text: str) -> tuple[str, ...]:
    """Word and punctuation tokens, NLTK-like. Several filters ask for the words of the same
    text in a row (Gopher repetition, Gopher quality, FineWeb): the last few are cached (a
    str caches its own hash, so a hit costs a dict lookup)."""
    return _words(text)


def content_words(tokens: list[str]) -> list[str]:
    """Tokens that are not a single punctuation character (Gopher's word count)."""
    return [w for w in tokens if w not in PUNCTUATION]


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, characters in the repeats); first occurrences don't count."""
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for x in items:
        if x in seen:
            dup_n += 1
            dup_chars += len(x)
        else:
            seen.add(x)
    return dup_n, dup_chars


CODE_LINES = "code_lines"  # metadata: the stripped lines of a document that are code (extract.mark_code)


def code_lines(doc) -> frozenset:
    return doc.metadata.get(CODE_LINES) or frozenset()


def prose_of(doc) -> str:
    """The text the quality heuristics judge: the document without its code lines, when
    the extractor marked them (``data.extract.mark_code``); else the whole text. Code stays
    in ``doc.text``, the training text: only the prose statistics ignore it."""
    code = code_lines(doc)
    if not code:
        return doc.text
    return "\n".join(ln for ln in doc.text.split("\n") if ln.strip() not in code)


_FENCE = re.compile(r"^\s*(```|~~~)")


def fenced_code_lines(text: str) -> set[str]:
    """Lines inside ``` / ~~~ fences (fences included) of a text document (Markdown-style)."""
    out, block = set(), None  # block: the lines of an open fence; an unclosed one is not code
    for line in text.split("\n"):
        fence = bool(_FENCE.match(line))
        if block is not None:
            block.append(line)
            if fence:
                out.update(ln.strip() for ln in block if ln.strip())
                block = None
        elif fence:
            block = [line]
    return out
