"""Each heuristic at and around its threshold, on hand-written documents."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.document import Document
from data_pipeline.filters import (
    BadWordsFilter,
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
    LanguageFilter,
    PIIScrubber,
    URLFilter,
)
from data_pipeline.filters.langid import predict_language

# Five-letter-ish prose words; "the" and "and" are Gopher stop words.
VOCAB = ["the", "river", "and", "stone", "garden", "window", "morning", "quiet", "forest", "letter"]


def prose(n: int, vocab=VOCAB) -> str:
    return " ".join(vocab[i % len(vocab)] for i in range(n))


def doc(text: str, url: str = "https://example.com/page") -> Document:
    return Document(id="d", text=text, url=url)


def reason(step, text: str, url: str = "https://example.com/page"):
    out = step.process(doc(text, url))
    return out if isinstance(out, str) else None


# ---------------------------------------------------------------- Gopher quality

def test_gopher_word_count_bounds_are_inclusive():
    f = GopherQualityFilter(max_doc_words=60)
    assert reason(f, prose(50)) is None
    assert reason(f, prose(49)) == "gopher_short_doc"
    assert reason(f, prose(60)) is None
    assert reason(f, prose(61)) == "gopher_long_doc"


def test_gopher_published_defaults():
    f = GopherQualityFilter()
    assert (f.min_doc_words, f.max_doc_words, f.min_avg_word_length, f.max_avg_word_length) == (50, 100_000, 3, 10)
    assert (f.max_symbol_word_ratio, f.max_bullet_lines_ratio, f.max_ellipsis_lines_ratio) == (0.1, 0.9, 0.3)
    assert (f.min_alpha_words_ratio, f.min_stop_words) == (0.8, 2)


def test_gopher_mean_word_length_window():
    f = GopherQualityFilter()
    assert reason(f, prose(60, ["the", "and", "cat"])) is None  # mean exactly 3
    assert reason(f, prose(60, ["the", "and", "ox"])) == "gopher_below_avg_threshold"
    long_words = ["the", "and", "internationalisation", "characterisation"]  # mean 10.5
    assert reason(f, prose(60, long_words)) == "gopher_above_avg_threshold"
    assert reason(f, prose(60, ["the", "and", "extraordinarily", "incomprehensible"])) is None  # mean 9.5


def test_gopher_hash_symbol_ratio():
    f = GopherQualityFilter()
    base = prose(50)
    assert reason(f, base + " #" * 5) is None  # 5 / 50 = 0.1 is allowed
    assert reason(f, base + " #" * 6) == "gopher_too_many_hashes"


def test_gopher_ellipsis_symbol_ratio():
    f = GopherQualityFilter()
    words = prose(50).split()
    mid = lambda k: " ".join(w + (" ..." if i < k else "") for i, w in enumerate(words))
    assert reason(f, mid(5)) is None
    assert reason(f, mid(6)) == "gopher_too_many_ellipsis"


def test_gopher_bullet_lines_ratio():
    f = GopherQualityFilter()
    lines = [prose(6) for _ in range(10)]
    nine = "\n".join(("• " if i < 9 else "") + ln for i, ln in enumerate(lines))
    ten = "\n".join("• " + ln for ln in lines)
    assert reason(f, nine) is None
    assert reason(f, ten) == "gopher_too_many_bullets"
    assert reason(f, "\n".join("- " + ln for ln in lines)) == "gopher_too_many_bullets"  # a dash is a bullet too


def test_gopher_ellipsis_line_endings_ratio():
    f = GopherQualityFilter()
    lines = [prose(6) for _ in range(10)]
    three = "\n".join(ln + ("…" if i < 3 else ".") for i, ln in enumerate(lines))
    four = "\n".join(ln + ("…" if i < 4 else ".") for i, ln in enumerate(lines))
    assert reason(f, three) is None
    assert reason(f, four) == "gopher_too_many_end_ellipsis"


def test_gopher_alphabetic_word_ratio():
    f = GopherQualityFilter()
    assert reason(f, prose(40) + " 123" * 10) is None  # 40 / 50 = 0.8
    assert reason(f, prose(39) + " 123" * 11) == "gopher_below_alpha_threshold"
    # Punctuation tokens count in the denominator (the recipe's ratio): 50 words, 13 commas.
    assert reason(f, prose(50) + " ," * 12) is None  # 50 / 62
    assert reason(f, prose(50) + " ," * 13) == "gopher_below_alpha_threshold"  # 50 / 63


def test_gopher_stop_words():
    f = GopherQualityFilter()
    no_stop = ["river", "stone", "garden", "window"]
    assert reason(f, "the and " + prose(50, no_stop)) is None
    assert reason(f, "the " + prose(50, no_stop)) == "gopher_enough_stop_words"
    # Distinct stop words, as written: repeating one, or capitalising it, does not count.
    assert reason(f, "the the the " + prose(50, no_stop)) == "gopher_enough_stop_words"
    assert reason(f, "The And " + prose(50, no_stop)) == "gopher_enough_stop_words"


# ---------------------------------------------------------------- Gopher repetition

def only(**kw) -> GopherRepetitionFilter:
    """A repetition filter with every rule off except the given ones."""
    base = {"dup_line_frac": None, "dup_para_frac": None, "dup_line_char_frac": None, "dup_para_char_frac": None,
                "top_ngram_fracs": [None] * 3, "dup_ngram_fracs": [None] * 6}
    base.update(kw)
    return GopherRepetitionFilter(**base)


def unique_lines(n: int) -> list[str]:
    return [f"line{i} alpha{i} beta{i} gamma{i} delta{i} epsilon{i}" for i in range(n)]


def test_repetition_published_defaults():
    f = GopherRepetitionFilter()
    assert (f.dup_line_frac, f.dup_para_frac, f.dup_line_char_frac, f.dup_para_char_frac) == (0.3, 0.3, 0.2, 0.2)
    assert f.top_ngram_fracs == [0.20, 0.18, 0.16]
    assert f.dup_ngram_fracs == [0.15, 0.14, 0.13, 0.12, 0.11, 0.10]


def test_duplicate_line_fraction():
    f = only(dup_line_frac=0.3)
    assert reason(f, "\n".join(unique_lines(7) + ["same"] * 4)) is None  # 3 repeats / 11 lines
    assert reason(f, "\n".join(unique_lines(6) + ["same"] * 5)) == "dup_line_frac"  # 4 / 11 = 0.36
    # blank lines between blocks are not "duplicate lines"
    assert reason(f, "\n\n".join(unique_lines(10))) is None


def test_duplicate_paragraph_fraction():
    f = only(dup_para_frac=0.3)
    assert reason(f, "\n\n".join(unique_lines(7) + ["same"] * 4)) is None  # 3 / 11 = 0.27
    assert reason(f, "\n\n".join(unique_lines(6) + ["same"] * 5)) == "dup_para_frac"


def test_duplicate_line_character_fraction():
    lines = unique_lines(4) + ["repeated line"] * 3
    text = "\n".join(lines)
    frac = 2 * len("repeated line") / len(text)
    assert reason(only(dup_line_char_frac=frac), text) is None
    assert reason(only(dup_line_char_frac=frac - 1e-6), text) == "dup_line_char_frac"


def test_top_2gram_character_fraction():
    words = ["aa", "bb"] * 5 + [f"c{i}" for i in range(10)]
    text = " ".join(words)
    frac = 5 * len("aa bb") / len(text)  # "aa bb" occurs 5 times
    assert reason(only(top_ngram_fracs=[frac, None, None]), text) is None
    assert reason(only(top_ngram_fracs=[frac - 1e-6, None, None]), text) == "top_2_gram"


def test_duplicated_5gram_character_fraction():
    rep = "one two three four five"
    text = " ".join([rep] + [f"w{i}" for i in range(20)] + [rep])
    frac = len(rep.replace(" ", "")) / len(text)  # the second occurrence; its words' characters only
    assert reason(only(dup_ngram_fracs=[frac, None, None, None, None, None]), text) is None
    assert reason(only(dup_ngram_fracs=[frac - 1e-6, None, None, None, None, None]), text) == "duplicated_5_n_grams"


def test_repetition_keeps_ordinary_prose_and_drops_spam():
    f = GopherRepetitionFilter()
    text = "\n".join(unique_lines(30))
    assert reason(f, text) is None
    assert reason(f, "buy cheap pills now " * 100) is not None


# ---------------------------------------------------------------- C4

def sentences(n: int) -> str:
    return "\n".join(f"Sentence number {i} is written here." for i in range(n))


def test_c4_needs_five_sentences_after_line_removal():
    f = C4QualityFilter()
    assert isinstance(f.process(doc(sentences(5))), Document)
    assert f.process(doc(sentences(4) + "\nA heading without punctuation")) == "c4_too_few_sentences"


def test_c4_removes_lines_without_terminal_punctuation_or_with_few_words():
    f = C4QualityFilter()
    out = f.process(doc("Navigation Home About\n" + sentences(5) + "\nToo short.\nAnd an ellipsis line here..."))
    assert out.text == sentences(5)


def test_c4_drops_javascript_and_policy_lines_and_citations():
    f = C4QualityFilter()
    text = sentences(5) + "\nPlease enable JavaScript to view this page.\nThis site uses cookies for analytics."
    text += "\nThe river is long[12] and wide[citation needed]."
    out = f.process(doc(text))
    assert "JavaScript" not in out.text and "cookies" not in out.text
    assert out.text.endswith("The river is long and wide.")


def test_c4_drops_lorem_ipsum_and_curly_braces():
    f = C4QualityFilter()
    assert f.process(doc(sentences(6) + "\nLorem ipsum dolor sit amet.")) == "c4_lorem_ipsum"
    assert f.process(doc(sentences(6) + "\nThe body is { return x; } here.")) == "c4_curly_bracket"
    assert isinstance(C4QualityFilter(filter_curly_bracket=False).process(
        doc(sentences(6) + "\nThe body is { return x; } here.")), Document)


def test_c4_sentence_count_within_line():
    f = C4QualityFilter()
    assert isinstance(f.process(doc("One is here. Two is here. Three is here. Four is here. Five is here.")), Document)
    assert f.process(doc("One is here. Two is here. Three is here. Four is here.")) == "c4_too_few_sentences"


# ---------------------------------------------------------------- FineWeb

def fw(**kw) -> FineWebQualityFilter:
    base = {"line_punct_thr": -1.0, "short_line_thr": 1.01, "char_duplicates_ratio": 1.01, "new_line_ratio": 1e9}
    base.update(kw)
    return FineWebQualityFilter(**base)


def test_fineweb_published_defaults():
    f = FineWebQualityFilter()
    assert (f.line_punct_thr, f.short_line_thr, f.short_line_length) == (0.12, 0.67, 30)
    assert (f.char_duplicates_ratio, f.new_line_ratio) == (0.01, 0.3)


def test_fineweb_line_punctuation_ratio():
    f = fw(line_punct_thr=0.12)
    lines = [f"line {i} of text" for i in range(100)]
    below = "\n".join(ln + ("." if i < 11 else "") for i, ln in enumerate(lines))
    at = "\n".join(ln + ("." if i < 12 else "") for i, ln in enumerate(lines))
    assert reason(f, below) == "fineweb_line_punct_ratio"  # < 0.12 drops
    assert reason(f, at) is None
    # Any script's sentence terminator counts; blank lines are not lines.
    assert reason(f, "\n\n".join(ln + ("。" if i < 12 else "") for i, ln in enumerate(lines))) is None


def test_fineweb_short_line_ratio():
    f = fw(short_line_thr=0.67)
    short, long = "x" * 30, "y" * 31  # 30 chars counts as short
    assert reason(f, "\n".join([short] * 68 + [long] * 32)) == "fineweb_short_line_ratio"
    assert reason(f, "\n".join([short] * 67 + [long] * 33)) is None  # > 0.67 drops


def test_fineweb_char_duplicate_ratio():
    lines = [f"unique line number {i} with some padding words" for i in range(20)] + ["dup line"] * 2
    text = "\n".join(lines)
    ratio = len("dup line") / len(text.replace("\n", ""))
    assert reason(fw(char_duplicates_ratio=ratio - 1e-6), text) == "fineweb_char_dup_ratio"  # > drops
    assert reason(fw(char_duplicates_ratio=ratio), text) is None


def test_fineweb_list_ratio():
    f = fw(new_line_ratio=0.3)
    assert reason(f, "\n".join(f"alpha beta gamma{i}" for i in range(10))) is None  # 9 newlines / 30 words
    assert reason(f, "\n".join(f"alpha beta{i}" for i in range(10))) == "fineweb_list_ratio"  # 9 / 20


# ---------------------------------------------------------------- language id

ENGLISH = ("The committee met on Tuesday to discuss the budget for the coming year, and most members "
           "agreed that the library should stay open longer in the evenings.")
FRENCH = ("Le comité s'est réuni mardi pour discuter du budget de l'année prochaine, et la plupart des "
          "membres ont convenu que la bibliothèque devrait rester ouverte plus tard le soir.")


def test_langid_keeps_english_and_records_language_and_score():
    f = LanguageFilter(languages=["en"])
    d = doc(ENGLISH)
    assert f.process(d) is d
    assert d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65


def test_langid_drops_other_languages_with_their_code():
    f = LanguageFilter(languages=["en"])
    assert f.process(doc(FRENCH)) == "lang_fr"
    assert isinstance(LanguageFilter(languages=[]).process(doc(FRENCH)), Document)  # [] keeps any language


def test_langid_min_score_is_inclusive():
    lang, score = predict_language(ENGLISH)
    assert lang == "en"
    assert isinstance(LanguageFilter(min_score=round(score, 4) - 1e-4).process(doc(ENGLISH)), Document)
    assert LanguageFilter(min_score=score + 1e-3).process(doc(ENGLISH)) == "lang_low_score"
    assert LanguageFilter().min_score == 0.65


def test_langid_model_is_the_offline_ftz_file():
    from data_pipeline.filters.langid import default_model_path

    assert default_model_path().endswith("lid.176.ftz")
    with pytest.raises(FileNotFoundError):
        LanguageFilter(model_path="/nonexistent/lid.bin").process(doc(ENGLISH))


# ---------------------------------------------------------------- URL / bad words / PII

def test_url_filter_blocks_domains_subdomains_and_url_words():
    f = URLFilter()
    assert reason(f, "x", "https://www.pornhub.com/view") == "url_adult_domain"
    assert reason(f, "x", "https://pornhub.com/") == "url_adult_domain"
    assert reason(f, "x", "https://free-porn-tube1.example.xxx/a.html") == "url_adult_word"
    assert reason(f, "x", "https://www.essex.ac.uk/sussex/middlesex") is None  # token, not substring
    assert reason(f, "x", "https://notpornhub.com.example.org/") is None


def test_url_filter_drops_gambling_hosts_and_keeps_look_alikes():
    f = URLFilter()
    assert reason(f, "x", "https://sports.bet365.com/en/football") == "url_gambling_domain"
    assert reason(f, "x", "https://www.pokerstars.com/") == "url_gambling_domain"
    assert reason(f, "x", "https://best-online-casino-bonus.example/") == "url_gambling_word"
    assert reason(f, "x", "https://example.org/sports-betting/odds") == "url_gambling_word"
    # Python's __slots__, an alphabet page, a pokerface blog: not gambling tokens.
    assert reason(f, "x", "https://docs.python.org/3/reference/datamodel/slots.html") is None
    assert reason(f, "x", "https://example.org/alphabet/bet-a") is None
    assert reason(f, "x", "https://pokerface.example.org/") is None
    only_adult = URLFilter(categories=["adult"])
    assert reason(only_adult, "x", "https://www.pokerstars.com/") is None
    assert reason(only_adult, "x", "https://pornhub.com/") == "url_adult_domain"


def test_url_filter_reads_a_user_file(tmp_path):
    p = tmp_path / "domains.txt"
    p.write_text("# my list\nbad.example.org\n")
    f = URLFilter(use_shipped_lists=False, domains_file=str(p))
    assert reason(f, "x", "https://a.bad.example.org/") == "url_blocked_domain"  # a user's list: "blocked"
    assert reason(f, "x", "https://www.pornhub.com/") is None  # shipped list switched off


def test_bad_words_ratio():
    text = "fuck " + prose(99)  # 1 bad word in 100
    assert reason(BadWordsFilter(max_ratio=0.0), text) == "bad_words"
    assert reason(BadWordsFilter(max_ratio=0.01), text) is None
    assert reason(BadWordsFilter(max_ratio=0.0099), text) == "bad_words"
    assert reason(BadWordsFilter(), "Scunthorpe is a town in England.") is None  # whole words only


def test_pii_replaces_emails_and_ipv4_but_not_versions():
    f = PIIScrubber()
    d = f.process(doc("Mail jane.doe+x@mail.example.co.uk or ping 192.168.10.254. Python 3.11.2 and 300.1.2.3 stay."))
    assert d.text == "Mail <EMAIL> or ping <IP_ADDRESS>. Python 3.11.2 and 300.1.2.3 stay."
    assert d.metadata["pii_replaced"] == 2
    assert PIIScrubber(emails=False).process(doc("a@b.com")).text == "a@b.com"


class _StringNGrams:
    """The repetition statistics as Gopher's recipe defines them, over n-grams as strings:
    the most frequent n-gram (words joined by spaces) times its count, and the characters of
    repeated n-grams (words joined with nothing), skipping past each repeat. Slow and plain:
    the reference the numpy implementation must equal exactly."""

    def __init__(self, words):
        self.words = list(words)

    def top_chars(self, n):
        import collections

        grams = [" ".join(self.words[i:i + n]) for i in range(len(self.words) - n + 1)]
        if not grams:
            return 0
        gram, count = collections.Counter(grams).most_common(1)[0]
        return len(gram) * count

    def dup_chars(self, n):
        grams = ["".join(self.words[i:i + n]) for i in range(len(self.words) - n + 1)]
        seen, chars, skip = set(), 0, 0
        for gram in grams:
            if skip:  # inside a repeat just counted: its n-grams are passed over
                skip -= 1
            elif gram in seen:
                chars, skip = chars + len(gram), n - 1
            else:
                seen.add(gram)
        return chars


def _sample_texts():
    """Every extracted page of the shipped sample, plus made-up repetitive ones (templated
    spam, overlapping repeats, ties for the most frequent n-gram, tiny documents)."""
    from data_pipeline.extract import HtmlExtractor
    from data_pipeline.readers.warc import WarcReader
    from tests.conftest import SAMPLE_WARC

    extract = HtmlExtractor()
    texts = [doc.text for doc in WarcReader([SAMPLE_WARC]) if extract.run_one(doc) is not None]
    texts += ["buy now " * 50, "a b a b a b c a b", "x", "", "one two three four five " * 3 + "six",
              "the cat sat on the mat and the dog sat on the log " * 7, "a a a a a a a a a a a a"]
    return texts


def test_repetition_statistics_equal_the_reference_implementation_on_the_sample():
    from data_pipeline.filters.quality import _NGrams
    from data_pipeline.text import words_of

    texts = _sample_texts()
    assert len(texts) > 300
    nonzero = 0
    for text in texts:
        words = words_of(text)
        fast, ref = _NGrams(words), _StringNGrams(words)
        for n in range(2, 5):
            assert fast.top_chars(n) == ref.top_chars(n), (n, text[:80])
        for n in range(5, 11):
            got = fast.dup_chars(n)
            assert got == ref.dup_chars(n), (n, text[:80])
            nonzero += got > 0
    assert nonzero > 100  # the repeated-n-gram path was exercised, not only the "no repeats" exit


def test_repeated_ngrams_are_compared_as_joined_characters_as_in_the_recipe(monkeypatch):
    """The recipe joins an n-gram's words with nothing before comparing, so "ab c d e f"
    repeats "a bc d e f". Word lists from a tiny alphabet make such repeats common; a hash
    that collides on everything forces the string fallback, which must agree too."""
    import random

    from data_pipeline.filters.quality import _NGrams

    words = ["ab", "c", "d", "e", "f"] + [f"w{i}" for i in range(10)] + ["a", "bc", "d", "e", "f"]
    assert _NGrams(words).dup_chars(5) == _StringNGrams(words).dup_chars(5) == len("abcdef")  # the second, "a bc d e f"
    rng = random.Random(0)
    cases = [[rng.choice(["a", "b", "ab", "ba", "aa", "c", "bc"]) for _ in range(rng.randint(0, 60))]
             for _ in range(500)]
    for words in cases:
        fast, ref = _NGrams(words), _StringNGrams(words)
        assert [fast.dup_chars(n) for n in range(5, 11)] == [ref.dup_chars(n) for n in range(5, 11)], words
    monkeypatch.setattr(_NGrams, "_substring_hashes", lambda self, n: np.zeros(max(self.n_words - n + 1, 0), np.uint64))
    for words in cases[:100]:
        fast, ref = _NGrams(words), _StringNGrams(words)
        assert [fast.dup_chars(n) for n in range(5, 11)] == [ref.dup_chars(n) for n in range(5, 11)], words


# ---------------------------------------------------------------- code-aware statistics

CODE_PAGE = """<html><body><main><h1>The json module</h1>
<p>This module encodes and decodes JSON, the lightweight data interchange format that many web
services speak. It offers an interface that users of the standard marshal and pickle modules
will recognise.</p>
<p>Encoding basic Python object hierarchies is shown below. The first call turns a list into a
string, and the second prints a quoted string with its escapes.</p>
<pre>&gt;&gt;&gt; import json
&gt;&gt;&gt; json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])
'["foo", {"bar": ["baz", null, 1.0, 2]}]'
&gt;&gt;&gt; def encode(obj):
...     if isinstance(obj, complex):
...         return [obj.real, obj.imag]
&gt;&gt;&gt; print(json.dumps({"c": 0, "b": 0}, sort_keys=True))
{"b": 0, "c": 0}</pre>
<p>Decoding is the reverse operation, and the decoder accepts any valid document. It returns the
Python objects that correspond to the values, with numbers parsed as integers or floats.</p>
<p>The encoder can be extended with a function that converts other objects. This is how the
module supports types it does not know, such as complex numbers in the example above.</p>
</main></body></html>"""


def extracted(mark_code: bool) -> Document:
    from data_pipeline.extract import HtmlExtractor

    d = Document(id="j", url="https://docs.example/json.html", raw=CODE_PAGE.encode(),
                 metadata={"content_type": "text/html; charset=utf-8"})
    return HtmlExtractor(mark_code=mark_code).process(d)


def test_marked_code_lines_are_judged_as_code_and_kept_in_the_text_with_their_indentation():
    from data_pipeline.text import CODE_LINES, prose_of

    plain, marked = extracted(False), extracted(True)
    assert plain.text == marked.text and CODE_LINES not in plain.metadata
    assert ">>> import json" in marked.metadata[CODE_LINES]
    assert ">>> import json" not in prose_of(marked) and "lightweight data interchange" in prose_of(marked)
    c4 = C4QualityFilter(filter_curly_bracket=True)
    # Unmarked, the code's braces condemn the page; marked, C4's rules apply to the prose only
    # and the code lines stay, indented, while prose lines without punctuation still go.
    assert c4.process(extracted(False)) == "c4_curly_bracket"
    kept = c4.process(extracted(True))
    assert isinstance(kept, Document)
    assert "...         return [obj.real, obj.imag]" in kept.text and "The json module" not in kept.text
    # The prose statistics: FineWeb's terminal-punctuation share is 4/13 non-blank lines over
    # the whole text and 4/5 over the prose, so a 0.5 cut tells them apart.
    fineweb = FineWebQualityFilter(line_punct_thr=0.5)
    assert fineweb.process(extracted(False)) == "fineweb_line_punct_ratio"
    assert isinstance(fineweb.process(extracted(True)), Document)


def test_fenced_code_in_text_documents_is_marked():
    from data_pipeline.extract import HtmlExtractor
    from data_pipeline.text import CODE_LINES, prose_of

    text = "Install it first.\n```bash\npip install kiln\n```\nThen run the tests, which take minutes."
    d = HtmlExtractor(mark_code=True).process(Document(id="t", text=text))
    assert d.metadata[CODE_LINES] == {"```bash", "pip install kiln", "```"}
    assert prose_of(d) == "Install it first.\nThen run the tests, which take minutes."
    unclosed = HtmlExtractor(mark_code=True).process(Document(id="u", text="Intro.\n```\nnot closed, so prose"))
    assert CODE_LINES not in unclosed.metadata  # an unclosed fence does not hide the rest from the filters
