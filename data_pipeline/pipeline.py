"""Build readers, steps and streams from the ``data`` config.

This is the one place that turns configuration into the data path, so the trainer, the
tokenizer trainer and ``prepare_data`` all see the same documents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.dedup import ExactDedup, MinHashDedup
from data_pipeline.document import Document
from data_pipeline.extract import HtmlExtractor
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
from data_pipeline.readers import (
    HFReader,
    JsonlReader,
    ParquetReader,
    Reader,
    WarcReader,
)
from data_pipeline.step import PipelineStep
from data_pipeline.stream import Batches, DocumentStream, PackedStream


def build_reader(src: SourceConfig, shard: int = 0, num_shards: int = 1) -> Reader:
    fmt = src.format
    if fmt in ("warc", "wet"):
        return WarcReader(list(src.paths), source=src.name, shard=shard, num_shards=num_shards)
    keys = {"text_key": src.text_key, "id_key": src.id_key, "url_key": src.url_key}
    if fmt == "jsonl":
        return JsonlReader(list(src.paths), source=src.name, shard=shard, num_shards=num_shards, **keys)
    if fmt == "parquet":
        return ParquetReader(list(src.paths), source=src.name, shard=shard, num_shards=num_shards, **keys)
    if fmt == "hf":
        return HFReader(src.hf_name, list(src.paths) or None, config=src.hf_config, split=src.hf_split,
                        source=src.name, shard=shard, num_shards=num_shards, **keys)
    raise ValueError(f"data source {src.name!r}: unknown format {fmt!r} (warc | wet | jsonl | parquet | hf)")


def _kwargs(block) -> dict:
    """A step's config block as constructor kwargs (without ``enabled``)."""
    if isinstance(block, DictConfig):
        d = OmegaConf.to_container(block, resolve=True)
    else:
        d = dataclasses.asdict(block)
    d.pop("enabled", None)
    return d


# (config block name, step class), in the order the steps run. The URL filter needs only
# the URL, so it runs before the (expensive) HTML extraction; the cheap language filter
# runs before the heuristics; dedup comes after filtering (FineWeb's order) so that its
# bounded index only holds documents that are kept; PII scrubbing edits the final text.
STEP_ORDER = (
    ("url_filter", URLFilter),
    ("extract", HtmlExtractor),
    ("langid", LanguageFilter),
    ("gopher_repetition", GopherRepetitionFilter),
    ("gopher_quality", GopherQualityFilter),
    ("c4_quality", C4QualityFilter),
    ("fineweb_quality", FineWebQualityFilter),
    ("bad_words", BadWordsFilter),
    ("exact_dedup", ExactDedup),
    ("minhash_dedup", MinHashDedup),
    ("pii", PIIScrubber),
)


def build_steps(cfg: DataConfig) -> list[PipelineStep]:
    """The processing steps in their fixed order; disabled ones are left out."""
    steps: list[PipelineStep] = []
    for key, cls in STEP_ORDER:
        block = getattr(cfg, key, None)
        if block is not None and block.enabled:
            steps.append(cls(**_kwargs(block)))
    return steps


def document_stream(cfg: DataConfig, split=None, shard: int = 0, num_shards: int = 1,
                    loop: bool = True) -> DocumentStream:
    if len(cfg.sources) != 1:
        raise ValueError("data.sources: exactly one source is supported by this stream builder")
    reader = build_reader(cfg.sources[0], shard, num_shards)
    return DocumentStream(reader, build_steps(cfg), split=split, val_fraction=cfg.val_fraction, loop=loop)


def iter_texts(cfg: DataConfig, max_docs: int) -> Iterator[str]:
    """Texts of the training split, one pass, for tokenizer training."""
    stream = document_stream(cfg, split="train", loop=False)
    for i, doc in enumerate(stream):
        if i >= max_docs:
            return
        yield doc.text


def train_batches(cfg: DataConfig, tokenizer, micro_batch_size: int, shard: int = 0,
                  num_shards: int = 1) -> Batches:
    docs = document_stream(cfg, split="train", shard=shard, num_shards=num_shards, loop=True)
    return Batches(PackedStream(docs, tokenizer, cfg.seq_len), micro_batch_size)


def validation_batches(cfg: DataConfig, tokenizer, micro_batch_size: int, max_batches: int,
                       shard: int = 0, num_shards: int = 1) -> list[dict]:
    """The held-out split, packed once and kept in memory (at most ``max_batches``)."""
    docs = document_stream(cfg, split="val", shard=shard, num_shards=num_shards, loop=False)
    batches = Batches(PackedStream(docs, tokenizer, cfg.seq_len), micro_batch_size)
    out = []
    for _ in range(max_batches):
        try:
            out.append(next(batches))
        except StopIteration:
            break
    return out


def documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document that survives the steps, one pass, both splits."""
    return document_stream(cfg, split=None, loop=False)
