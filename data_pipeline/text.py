"""Text helpers shared by the filters: how a text splits into words and sentences, in one place.

Two word tokenizers (``data.words``):
  * ``kiln`` (default): words are runs of word characters (apostrophes inside words kept),
    a run of dots is one token, and every other non-space character is its own token. No
    dependency, no download, and fast; close to, but not the same as, the recipe's tokenizer.
  * ``spacy``: the tokenizer the FineWeb recipe counts with (datatrove's English word
    tokenizer is spaCy's rule-based ``blank("en")`` tokenizer, sentences from its
    ``sentencizer``). No model download; ``pip install 'kiln[fineweb]'``. ``conf/data/fineweb.yaml``
    selects it so that a threshold decides as it does in the recipe.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import string

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*|\.{2,}|[^\w\s]")  # an ellipsis is one token, as in the recipe
# Lines ending with one of these count as sentences for C4's line rule (C4's END_PUNCTUATION).
END_PUNCTUATION = (".", "?", "!", '"', "'")

# FineWeb's line-end rule: a line "ends in punctuation" when its last character is a sentence
# terminator of any script: Unicode's Sentence_Terminal property (generated with the ``regex``
# module, Unicode 17) plus three Khmer signs the recipe also counts (U+17D6, U+17D9, U+17DA), less
# the 14 it does not (its list predates them: Balinese, Coptic, Tulu-Tigalari, Kirat Rai, and the
# one-dot leader and vertical presentation forms).
_NOT_IN_RECIPE = frozenset("\u1b4e\u1b4f\u1b7f\u2024\u2cf9\u2cfa\u2cfb\ufe12\ufe15\ufe16"
                           "\U000113d4\U000113d5\U00016d6e\U00016d6f")
TERMINAL_PUNCTUATION = tuple(c for c in (
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965"
    "\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803\u1809\u1944"
    "\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b4e\u1b4f\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1b7f\u1c3b\u1c3c"
    "\u1c7e\u1c7f\u2024\u203c\u203d\u2047\u2048\u2049\u2cf9\u2cfa\u2cfb\u2e2e\u2e3c\u2e53\u2e54\u3002"
    "\ua4ff\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0"
    "\uaaf1\uabeb\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57"
    "\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89"
    "\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143"
    "\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c"
    "\U000112a9\U000113d4\U000113d5\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca"
    "\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3"
    "\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e"
    "\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7"
    "\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016d6e\U00016d6f\U00016e98\U0001bc9f\U0001da88"
) if c not in _NOT_IN_RECIPE)


# Tokens made only of these characters are symbols, not words, for Gopher's word count: ASCII
# punctuation, C0/C1 control characters (tab and newline excepted) and the typographic and
# CJK marks the recipe lists, and every sentence terminator (datatrove's PUNCTUATION_SET,
# the same characters).
PUNCTUATION = frozenset(
    string.punctuation
    + "".join(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)]))
    + "«´»–—’“”„…∶━►、。〈〉《》「」【】！％（），．１：；？～"
    + "".join(TERMINAL_PUNCTUATION)
)


@functools.lru_cache(maxsize=4)
def _words(text: str) -> tuple[str, ...]:
    return tuple(_WORD_RE.findall(text))


def words_of(text: str) -> tuple[str, ...]:
    """Word and punctuation tokens of the ``kiln`` tokenizer. Several filters ask for the
    words of the same text in a row (Gopher repetition, Gopher quality, FineWeb): the last
    few are cached (a str caches its own hash, so a hit costs a dict lookup)."""
    return _words(text)


_SENTENCE_END = re.compile(r"[.!?]+(?:['\")\]]*)(?=\s|$)")


class KilnWords:
    """The default tokenizer (see the module docstring)."""

    name = "kiln"

    def words(self, text: str) -> tuple[str, ...]:
        return words_of(text)

    def sentences(self, line: str) -> int:
        """Sentences in a line that already passed C4's line rules (at least 1)."""
        return max(1, len(_SENTENCE_END.findall(line)))


class SpacyWords:
    """The FineWeb recipe's English tokenizer: spaCy's rule-based tokenizer (no trained model),
    tokens stripped and whitespace tokens dropped, sentences from spaCy's sentencizer.

    spaCy remembers every string it has seen (its vocab and tokenizer cache), which makes
    the next page faster but grows without bound over a crawl; scoping each call in a
    ``memory_zone`` (as datatrove does) is 2.5x slower here. So the pipeline is simply
    rebuilt (0.2 s) once it holds ``max_strings`` strings: same tokens, bounded memory."""

    name = "spacy"

    def __init__(self, max_strings: int = 1_000_000):
        if importlib.util.find_spec("spacy") is None:
            raise ImportError("data.words=spacy needs the spaCy package: pip install 'kiln[fineweb]'")
        self.max_strings = max_strings
        self._nlp = None
        self.builds = 0

    def _pipeline(self):
        if self._nlp is None or len(self._nlp.vocab.strings) > self.max_strings:
            import spacy

            self._nlp = spacy.blank("en")
            self._nlp.add_pipe("sentencizer")
            self._nlp.max_length = 10**9  # whole documents, as the recipe passes them
            self.builds += 1
        return self._nlp

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one instance per process: word_tokenizer caches it)
    def words(self, text: str) -> tuple[str, ...]:
        return tuple(t for t in (tok.text.strip() for tok in self._pipeline().tokenizer(text)) if t)

    def sentences(self, line: str) -> int:
        """Sentences in a line; a line with none (blank) is one, as the recipe counts it."""
        return max(1, sum(1 for _ in self._pipeline()(line).sents))


WORD_TOKENIZERS = {"kiln": KilnWords, "spacy": SpacyWords}


@functools.cache
def word_tokenizer(name: str):
    """The tokenizer named by ``data.words``, one per process (filters keep the name, so they
    pickle to worker processes without a spaCy object)."""
    if name not in WORD_TOKENIZERS:
        raise ValueError(f"data.words: unknown word tokenizer {name!r} ({' | '.join(WORD_TOKENIZERS)})")
    return WORD_TOKENIZERS[name]()


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
