"""Throughput of the data path on the bundled sample (prints numbers; not a test).

1. WARC -> filtered text with the default chain (conf/data/sample.yaml, or ``--data
   fineweb`` for the FineWeb preset): docs/s and MB/s of HTML payload, per core (one
   process = one core), with the time of every step.
2. Tokenize + pack: tokens/s per core for PackedStream over the surviving documents.
3. The FineWeb recipe's four text filters (Gopher repetition, Gopher quality, C4 without
   the terminal-punctuation rule, FineWeb) on the same extracted English texts: kiln's with
   each word tokenizer (``data.words``), and, if installed, datatrove's (with its own
   English tokenizer, spaCy), with the pages each keeps and the speed.

    python benchmarks/bench_pipeline.py [--data fineweb]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def sample_cfg(*overrides):
    from hydra import compose, initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose(config_name="pretrain", overrides=list(overrides)).data


def bench_filter_chain(cfg):
    from data_pipeline.pipeline import build_reader, build_steps

    reader, steps = build_reader(cfg.sources[0]), build_steps(cfg)
    per_step = dict.fromkeys([reader.name] + [s.name for s in steps], 0.0)
    t0 = time.perf_counter()
    raw = list(reader)
    per_step[reader.name] = time.perf_counter() - t0
    kept = []
    for doc in raw:
        for s in steps:
            t = time.perf_counter()
            doc = s.run_one(doc)
            per_step[s.name] += time.perf_counter() - t
            if doc is None:
                break
        else:
            kept.append(doc)
    total = time.perf_counter() - t0
    mb = reader.stats.bytes_kept / 1e6
    n_in = reader.stats.seen
    print(f"[filter chain] {n_in} WARC records ({mb:.1f} MB HTML) -> {len(kept)} docs in {total:.2f} s: "
          f"{n_in / total:.1f} docs/s/core, {mb / total:.2f} MB/s/core")
    for name, sec in per_step.items():
        print(f"    {name:<18} {sec:7.3f} s  ({100 * sec / total:4.1f}%)")
    return kept


def bench_packing(docs, seq_len: int = 256):
    from data_pipeline.stream import PackedStream
    from data_pipeline.tokenizer import train_tokenizer

    path = os.path.join(tempfile.mkdtemp(), "tok.model")
    tok = train_tokenizer((d.text for d in docs), path, vocab_size=4096)
    texts = [d.text for d in docs]

    class Docs:
        def __init__(self):
            self.i = 0

        def __next__(self):
            if self.i >= len(texts):
                raise StopIteration
            self.i += 1
            return type("D", (), {"text": texts[self.i - 1], "metadata": {}})()

    t0 = time.perf_counter()
    n = 0
    for _ in PackedStream(Docs(), tok, seq_len):
        n += seq_len
    dt = time.perf_counter() - t0
    print(f"[tokenize+pack] {n} tokens in {dt:.2f} s: {n / dt:,.0f} tokens/s/core (SentencePiece BPE 4096, seq {seq_len})")


def english_texts(cfg):
    """Extracted, English texts of the sample: the input both filter implementations see."""
    from data_pipeline.extract import HtmlExtractor
    from data_pipeline.filters import LanguageFilter
    from data_pipeline.pipeline import build_reader

    ex, lid = HtmlExtractor(), LanguageFilter()
    out = []
    for d in build_reader(cfg.sources[0]):
        d = ex.run_one(d)
        if d is not None and lid.run_one(d) is not None:
            out.append(d)
    return out


def _run_chain(steps, docs) -> tuple[float, int]:
    t0, kept = time.perf_counter(), 0
    for d in docs:
        d = copy.copy(d)
        for f in steps:
            d = f.run_one(d)
            if d is None:
                break
        else:
            kept += 1
    return time.perf_counter() - t0, kept


def bench_recipe_filters(docs):
    from data_pipeline.pipeline import build_steps

    recipe = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
    for words in ("kiln", "spacy"):
        steps = [s for s in build_steps(sample_cfg("data=fineweb", f"data.words={words}")) if s.name in recipe]
        sec, kept = _run_chain(steps, docs)
        print(f"[kiln, words={words:<5}] {len(docs)} docs in {sec:.3f} s ({len(docs) / sec:.0f} docs/s), kept {kept}")
    try:
        from datatrove.data import Document as DTDoc
        from datatrove.pipeline.filters import (
            C4QualityFilter,
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
    except ImportError as exc:
        print(f"[datatrove] not installed ({exc}); pip install datatrove to compare")
        return
    theirs = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False),
              FineWebQualityFilter()]
    t0, kept = time.perf_counter(), 0
    for d in docs:
        doc = DTDoc(text=d.text, id=d.id)
        kept += all(f.filter(doc) is True for f in theirs)
    sec = time.perf_counter() - t0
    print(f"[datatrove]            {len(docs)} docs in {sec:.3f} s ({len(docs) / sec:.0f} docs/s), kept {kept}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="a data preset (conf/data/<name>.yaml), e.g. fineweb")
    args = ap.parse_args(argv)
    cfg = sample_cfg(*([f"data={args.data}"] if args.data else []))
    kept = bench_filter_chain(cfg)
    bench_packing(kept)
    bench_recipe_filters(english_texts(cfg))


if __name__ == "__main__":
    main()
