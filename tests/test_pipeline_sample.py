"""The embedded default (conf/data/sample.yaml) on the labelled sample: junk goes, good English stays.

Measured on the bundled sample.warc.gz (335 response records, 228 labelled good English
pages): with conf/data/sample.yaml 165 good English pages survive the whole chain (153
without ``data.extract.mark_code``, which sample.yaml turns on); with the published
thresholds of every step (the dataclass defaults) only 17 do, which is why sample.yaml
relaxes four thresholds (see the comments there). benchmarks/bench_filter_recall.py prints
these numbers.
"""

from __future__ import annotations

import collections
import json
import os

import pytest
from hydra import compose, initialize_config_dir

from data_pipeline.pipeline import documents

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = os.path.join(REPO, "data_pipeline", "assets", "sample_labels.jsonl")


def sample_data_cfg():
    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose(config_name="pretrain").data


@pytest.fixture(scope="module")
def outcome():
    """One pass of ``documents(cfg)``; per record id the step that removed it, or KEPT; and
    the kept text per record id."""
    cfg = sample_data_cfg()
    stream = documents(cfg)
    fate = {}

    def recording(step):
        inner = step.run_one

        def run_one(doc):
            out = inner(doc)
            if out is None:
                fate[doc.id] = step.name
            return out
        return run_one

    for step in stream.steps:
        step.run_one = recording(step)
    kept_text = {}
    for doc in stream:
        fate[doc.id] = "KEPT"
        kept_text[doc.id] = doc.text
    with open(LABELS) as f:
        labels = [json.loads(line) for line in f]
    return fate, labels, stream.steps, stream.reader, kept_text


def test_sample_config_runs_the_full_chain(outcome):
    _, _, steps, _, _ = outcome
    assert [s.name for s in steps] == ["url_filter", "html_extract", "langid", "gopher_repetition",
                                       "gopher_quality", "c4_quality", "fineweb_quality", "bad_words",
                                       "exact_dedup", "minhash_dedup", "pii"]


def test_sample_junk_is_removed(outcome):
    fate, labels, _, _, _ = outcome
    junk = {"spam", "adult_url", "symbols", "short", "binary", "charset", "pathological", "boilerplate"}
    survivors = [lab["url"] for lab in labels if lab["kind"] in junk and fate.get(lab["record_id"]) == "KEPT"]
    assert survivors == []


def test_sample_adult_urls_are_removed_by_the_url_filter(outcome):
    fate, labels, _, _, _ = outcome
    assert {fate[lab["record_id"]] for lab in labels if lab["kind"] == "adult_url"} == {"url_filter"}


def test_sample_keeps_at_most_one_page_of_each_duplicate_group(outcome):
    fate, labels, _, _, _ = outcome
    groups = collections.defaultdict(list)
    for lab in labels:
        groups[lab.get("dup_of_url") or lab["url"]].append(lab)
    multi = {k: g for k, g in groups.items() if len(g) > 1}
    assert len(multi) >= 15
    for original, group in multi.items():
        n_kept = sum(fate.get(lab["record_id"]) == "KEPT" for lab in group)
        assert n_kept <= 1, (original, [(lab["url"], fate.get(lab["record_id"])) for lab in group])
    dedup_removed = sum(fate.get(lab["record_id"]) in ("exact_dedup", "minhash_dedup") for g in multi.values() for lab in g)
    assert dedup_removed >= 15  # measured 21: the rest were removed by a filter before dedup


def test_sample_non_english_pages_are_removed(outcome):
    fate, labels, _, _, _ = outcome
    foreign = [lab for lab in labels if lab["kind"] == "good" and lab["lang"] != "en"]
    assert len(foreign) == 48
    kept = [lab["url"] for lab in foreign if fate[lab["record_id"]] == "KEPT"]
    # Measured: one "French" Debian Reference chapter (ch07.fr) is an untranslated English page.
    assert len(kept) <= 1


def test_sample_most_good_english_pages_survive(outcome):
    fate, labels, _, _, _ = outcome
    good = [lab for lab in labels if lab["expected_keep_english"]]
    n_kept = sum(fate.get(lab["record_id"]) == "KEPT" for lab in good)
    assert len(good) == 228
    assert n_kept >= 160  # measured 165 (72%; 153 without mark_code); >= 100 needed for the default training run


def test_sample_default_marks_code_so_kept_pages_keep_their_examples(outcome):
    """mark_code is on in the embedded default: C4 keeps the code lines of <pre> blocks, so
    interactive examples survive in the kept text (without it C4's line rules strip them)."""
    cfg = sample_data_cfg()
    assert cfg.extract.mark_code is True
    fate, labels, _, _, kept_text = outcome
    good = [lab for lab in labels if lab["expected_keep_english"] and fate.get(lab["record_id"]) == "KEPT"]
    assert sum(">>> " in kept_text[lab["record_id"]] for lab in good) >= 50  # measured 67 (18 without mark_code)


def test_sample_reader_skips_non_html_and_empty_records_and_counts_the_warcinfo_record(outcome):
    _, _, _, reader, _ = outcome
    assert dict(reader.stats.removed_by_reason) == {"non_html": 3, "empty": 1, "record_type:warcinfo": 1}
    assert reader.stats.seen == 336  # 335 response records and the file's warcinfo record
