"""Throughput of the data path on the bundled sample (prints numbers; not a test).

1. WARC -> filtered text with the default chain (conf/data/sample.yaml): docs/s and MB/s
   of HTML payload, per core (one process = one core), with the time of every step.
2. Tokenize + pack: tokens/s per core for PackedStream over the surviving documents.
3. If datatrove is installed: its Gopher repetition + Gopher quality + C4 + FineWeb
   filters with default thresholds on the same extracted English texts, against kiln's
   same four filters, and the speed ratio. NLTK's punkt data cannot be downloaded here, so
   datatrove is given kiln's regex word/sentence tokenizer (the tokenizer is not what is
   compared).

    python benchmarks/bench_pipeline.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def sample_cfg():
    from hydra import compose, initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base=None):
        return compose(config_name="pretrain").data


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


def bench_vs_datatrove(docs):
    from data_pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    ours = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()]
    t0 = time.perf_counter()
    kept_ours = 0
    for d in docs:
        d = copy.copy(d)
        for f in ours:
            d = f.run_one(d)
            if d is None:
                break
        else:
            kept_ours += 1
    t_ours = time.perf_counter() - t0
    print(f"[kiln filters]      {len(docs)} docs in {t_ours:.3f} s ({len(docs) / t_ours:.0f} docs/s), kept {kept_ours}")
    try:
        from datatrove.data import Document as DTDoc
        from datatrove.pipeline.filters import (
            C4QualityFilter as DC4,
        )
        from datatrove.pipeline.filters import (
            FineWebQualityFilter as DFW,
        )
        from datatrove.pipeline.filters import (
            GopherQualityFilter as DGQ,
        )
        from datatrove.pipeline.filters import (
            GopherRepetitionFilter as DGR,
        )
        from datatrove.utils.word_tokenizers import WordTokenizer
    except ImportError as exc:
        print(f"[datatrove] not installed ({exc}); pip install datatrove to compare")
        return
    from data_pipeline.text import words_of

    class RegexTokenizer(WordTokenizer):
        def word_tokenize(self, text):
            return words_of(text)

        def sent_tokenize(self, text):
            return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]

        def span_tokenize(self, text):
            return [(m.start(), m.end()) for m in re.finditer(r"\S[^.!?]*[.!?]?", text)]

        def __hash__(self):
            return 1

    tok = RegexTokenizer("en")
    theirs = [DGR(language=tok), DGQ(language=tok), DC4(language=tok), DFW(language=tok)]
    t0 = time.perf_counter()
    kept_theirs = 0
    for d in docs:
        doc = DTDoc(text=d.text, id=d.id)
        ok = True
        for f in theirs:
            res = f.filter(doc)
            if res is False or (isinstance(res, tuple) and not res[0]):
                ok = False
                break
        kept_theirs += ok
    t_dt = time.perf_counter() - t0
    print(f"[datatrove filters] {len(docs)} docs in {t_dt:.3f} s ({len(docs) / t_dt:.0f} docs/s), kept {kept_theirs}")
    print(f"[ratio] kiln is {t_dt / t_ours:.2f}x datatrove's speed on the same four filters and texts")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args(argv)
    cfg = sample_cfg()
    kept = bench_filter_chain(cfg)
    bench_packing(kept)
    bench_vs_datatrove(english_texts(cfg))


if __name__ == "__main__":
    main()
