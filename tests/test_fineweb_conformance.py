"""``data=fineweb`` keeps and drops pages as the FineWeb recipe does, on the same text.

The reference is recorded once from datatrove (scripts/record_fineweb_decisions.py) on the
text of every page of the embedded sample (326 pages: English and six other languages of
documentation, and the planted junk) and 26 crafted texts that trigger the rules and corner
cases the sample does not; this test needs neither datatrove nor the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest
from hydra import compose, initialize_config_dir

from data_pipeline.document import Document
from data_pipeline.pipeline import build_steps
from data_pipeline.text import word_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data", "fineweb_conformance")
TEXT_STEPS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def _jsonl_gz(name: str) -> list[dict]:
    with gzip.open(os.path.join(DATA, name), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def recorded():
    texts = _jsonl_gz("texts.jsonl.gz")
    decisions = {d["id"]: d for d in _jsonl_gz("datatrove_decisions.jsonl.gz")}
    assert len(texts) == len(decisions) == 352
    return texts, decisions


def recorded_with() -> str:
    from importlib.metadata import version

    with open(os.path.join(DATA, "recorded_with.json")) as f:
        was = json.load(f)
    return f"recorded with spaCy {was['spacy']} (datatrove {was['datatrove']}); installed: spaCy {version('spacy')}"


def data_cfg(*overrides):
    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose(config_name="pretrain", overrides=["data=fineweb", *overrides]).data


def recipe_reason(step: str, reason: str) -> str:
    """kiln's reason as datatrove names it: the same name, but for the prefix kiln puts on
    C4's and FineWeb's own reasons (datatrove's are bare: "too_few_sentences")."""
    for prefix in ("c4_", "fineweb_"):
        if step.startswith(prefix.rstrip("_")) and reason.startswith(prefix):
            reason = reason[len(prefix):]
    return f"{step}:{reason}"


def run(steps, text: str, doc_id: str, edited: list | None = None) -> str:
    """'keep', or 'step:reason' of the first step that drops the page (steps edit the text:
    the text they leave is appended to ``edited``)."""
    doc = Document(id=doc_id, text=text)
    for step in steps:
        out = step.process(doc)
        if out is None or isinstance(out, str):
            return recipe_reason(step.name, out or "dropped")
        doc = out
    if edited is not None:
        edited.append(doc.text)
    return "keep"


def text_steps(cfg):
    steps = [s for s in build_steps(cfg) if s.name in TEXT_STEPS]
    assert [s.name for s in steps] == list(TEXT_STEPS)
    return steps


def test_fineweb_preset_is_the_recipe_chain_at_published_thresholds():
    from data_pipeline.config import DataConfig

    cfg = data_cfg()
    names = [s.name for s in build_steps(cfg)]
    assert names == ["url_filter", "html_extract", "langid", "gopher_repetition", "gopher_quality",
                     "c4_quality", "fineweb_quality", "minhash_dedup", "pii"]
    assert cfg.words == "spacy"
    assert all(s.words == "spacy" for s in text_steps(cfg))
    assert (cfg.langid.languages, cfg.langid.min_score) == (["en"], 0.65)
    assert cfg.c4_quality.filter_no_terminal_punct is False
    published = DataConfig()
    for block in TEXT_STEPS + ("minhash_dedup",):
        got, want = dict(cfg[block]), vars(getattr(published, block))
        differ = {k for k in want if k != "enabled" and got[k] != want[k]}
        assert differ == ({"filter_no_terminal_punct"} if block == "c4_quality" else set()), block


@pytest.fixture(scope="module")
def kiln_decisions(recorded):
    """Per page: the preset's decision through the chain and each step's alone, and the
    recipe tokenizer's words and sentences (one pass, page by page, so the words of a page
    are split once and shared by the steps, as in a run)."""
    texts, _ = recorded
    steps = text_steps(data_cfg())
    spacy = word_tokenizer("spacy")
    out = {}
    for t in texts:
        words = spacy.words(t["text"])
        c4_text: list[str] = []
        out[t["id"]] = {
            "decision": run(steps, t["text"], t["id"]),
            "alone": {s.name: run([s], t["text"], t["id"], c4_text if s.name == "c4_quality" else None)
                      for s in steps},
            "c4_text_sha1": hashlib.sha1(c4_text[0].encode()).hexdigest() if c4_text else None,
            "words": (len(words), hashlib.sha1("\x00".join(words).encode()).hexdigest()),
            "n_sentences": spacy.sentences(t["text"]),
        }
    return out


def test_fineweb_preset_decides_as_datatrove_on_every_shipped_page(recorded, kiln_decisions):
    _, decisions = recorded
    got = {i: d["decision"] for i, d in kiln_decisions.items()}
    want = {i: d["decision"] for i, d in decisions.items()}
    assert got == want
    # The recipe drops most of this code-heavy sample, for several different reasons, so
    # agreeing is not agreeing on one easy case.
    kept = sum(v == "keep" for v in want.values())
    assert 20 <= kept <= 100, kept
    assert len({v for v in want.values() if v != "keep"}) >= 10


def test_each_recipe_step_alone_decides_as_datatrove(recorded, kiln_decisions):
    _, decisions = recorded
    for i, d in decisions.items():
        want = {name: "keep" if why is None else f"{name}:{why}" for name, why in d["alone"].items()}
        assert kiln_decisions[i]["alone"] == want, i
        assert kiln_decisions[i]["c4_text_sha1"] == d["c4_text_sha1"], i  # the lines C4 keeps, too
    # Every rule of the four filters decided some text alone (the crafted texts see to that).
    reasons = {f"{name}:{why}" for d in decisions.values() for name, why in d["alone"].items() if why}
    assert len(reasons) >= 28, sorted(reasons)


def test_recipe_tokenizer_splits_words_and_sentences_as_recorded(recorded, kiln_decisions):
    _, decisions = recorded
    for i, d in decisions.items():
        assert kiln_decisions[i]["words"] == (d["n_words"], d["words_sha1"]), f"{i}: {recorded_with()}"
        assert kiln_decisions[i]["n_sentences"] == d["n_sentences"], f"{i}: {recorded_with()}"


def test_default_tokenizer_is_not_the_recipe_and_the_comparison_sees_it(recorded):
    """kiln's own tokenizer (fast, no dependency) splits differently, and the decisions then
    differ on some pages: the conformance check above can fail."""
    texts, decisions = recorded
    steps = text_steps(data_cfg("data.words=kiln"))
    differ = [t["url"] for t in texts if run(steps, t["text"], t["id"]) != decisions[t["id"]]["decision"]]
    assert 0 < len(differ) < len(texts) // 2, len(differ)


def test_recipe_tokenizer_bounds_its_memory_and_splits_the_same_after_a_rebuild(recorded):
    from data_pipeline.text import SpacyWords

    texts, decisions = recorded
    small = SpacyWords(max_strings=2_000)  # rebuilt many times over these pages
    for t in texts[:40]:
        words = small.words(t["text"])
        assert len(small._nlp.vocab.strings) <= 2_000 + len(set(words)) + 2_000  # one page's worth at most
        assert hashlib.sha1("\x00".join(words).encode()).hexdigest() == decisions[t["id"]]["words_sha1"]
    assert small.builds > 5


def test_fineweb_preset_run_keeps_exactly_the_recipe_pages_that_are_english_and_unique(recorded):
    """The whole preset chain over the sample WARC: what it keeps is what datatrove's text
    filters keep, less what the URL filter, language ID and MinHash take (steps the recorded
    decisions do not cover)."""
    from data_pipeline.audit import RemovedBy
    from data_pipeline.pipeline import documents

    _, decisions = recorded
    stream = documents(data_cfg())
    removed = RemovedBy().watch(stream)
    kept = {doc.id for doc in stream}
    recipe_keeps = {i for i, d in decisions.items() if d["decision"] == "keep"}
    assert kept and kept <= recipe_keeps
    assert {removed.step[i] for i in recipe_keeps - kept} <= {"url_filter", "langid", "minhash_dedup"}
    assert all(removed.step[i] in TEXT_STEPS for i in decisions if i not in recipe_keeps and i in removed.step
               and removed.step[i] not in ("url_filter", "langid"))


def test_recipe_counts_a_blank_line_as_one_sentence_and_bad_names_fail_at_construction():
    from data_pipeline.filters import C4QualityFilter

    assert word_tokenizer("spacy").sentences("") == 1  # the recipe's sentence split of "" is [""]
    c4 = C4QualityFilter(filter_no_terminal_punct=False, min_words_per_line=-1, words="spacy")
    assert isinstance(c4.process(Document(id="b", text="\n" * 5 + "This is one line of text.")), Document)
    with pytest.raises(ValueError, match="data.words"):
        C4QualityFilter(words="nltk")
