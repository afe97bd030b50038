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
    QualityModelFilter,
    URLFilter,
)
from data_pipeline.loader import StreamingLoader
from data_pipeline.mixture import MixtureStream
from data_pipeline.readers import (
    HFReader,
    JsonlReader,
    ParquetReader,
    Reader,
    WarcReader,
)
from data_pipeline.step import PipelineStep
from data_pipeline.stream import Batches, DocumentStream, PackedStream
from data_pipeline.token_shards import TokenMixture, TokenShards, TokenWindows


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
    ("quality_model", QualityModelFilter),
    ("exact_dedup", ExactDedup),
    ("minhash_dedup", MinHashDedup),
    ("pii", PIIScrubber),
)


# Steps that count words or sentences: they all use the one tokenizer ``data.words`` names.
COUNTS_WORDS = (GopherRepetitionFilter, GopherQualityFilter, C4QualityFilter, FineWebQualityFilter)


# What a learned quality model replaces with data.quality_model.replace_heuristics=true.
HEURISTICS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "bad_words")


def build_steps(cfg: DataConfig) -> list[PipelineStep]:
    """The processing steps in their fixed order; disabled ones are left out, and the
    heuristics too when the quality model replaces them."""
    steps: list[PipelineStep] = []
    qm = getattr(cfg, "quality_model", None)
    replaced = HEURISTICS if qm is not None and qm.enabled and qm.replace_heuristics else ()
    for key, cls in STEP_ORDER:
        block = getattr(cfg, key, None)
        if block is not None and block.enabled and key not in replaced:
            kwargs = _kwargs(block)
            if cls in COUNTS_WORDS:
                kwargs["words"] = cfg.words
            steps.append(cls(**kwargs))
    return steps


def source_stream(cfg: DataConfig, src: SourceConfig, split=None, shard: int = 0, num_shards: int = 1,
                  loop: bool = True) -> DocumentStream:
    """One source through the step chain (no steps for a source marked ``steps: false``,
    e.g. shards already filtered by ``launch/prepare_data.py``)."""
    reader = build_reader(src, shard, num_shards)
    steps = build_steps(cfg) if src.steps else []
    return DocumentStream(reader, steps, split=split, val_fraction=cfg.val_fraction, loop=loop)


class TokenCounter:
    """Mixture length function that tokenizes once: the ids ride along in the metadata
    and ``PackedStream`` uses them, so token shares cost no second tokenization."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __call__(self, doc: Document) -> int:
        ids = self.tok.encode(doc.text, bos=False, eos=True)
        doc.metadata["token_ids"] = ids
        return len(ids)


def document_stream(cfg: DataConfig, split=None, shard: int = 0, num_shards: int = 1,
                    loop: bool = True, tokenizer=None):
    """A single source's ``DocumentStream``, or a ``MixtureStream`` over several sources
    (weights are token shares; lengths in tokens when ``tokenizer`` is given, else bytes)."""
    if not cfg.sources:
        raise ValueError("data.sources: no data source configured")
    streams = [source_stream(cfg, src, split, shard, num_shards, loop) for src in cfg.sources]
    if len(streams) == 1:
        return streams[0]
    kw = {"length_fn": TokenCounter(tokenizer)} if tokenizer is not None else {}
    return MixtureStream(streams, [src.weight for src in cfg.sources], [src.name for src in cfg.sources],
                         seed=cfg.seed, loop=loop, **kw)


def source_streams(docs) -> list:
    """The DocumentStreams behind what ``document_stream`` returned: itself, or the sources
    of a mixture."""
    return list(getattr(docs, "streams", None) or [docs])


def pipeline_parts(docs) -> list:
    """Each source's reader and steps, in run order (their stats make the data report)."""
    return [part for src in source_streams(docs) for part in (src.reader, *src.steps)]


def iter_texts(cfg: DataConfig, max_docs: int) -> Iterator[str]:
    """Texts of the training split, one pass, for tokenizer training."""
    stream = document_stream(cfg, split="train", loop=False)
    n = 0
    for n, doc in enumerate(stream, 1):
        if n > max_docs:
            return
        yield doc.text
    if n == 0:
        sources = getattr(stream, "streams", [stream])
        raise ValueError("the training split produced no document to train the tokenizer on: "
                         + " | ".join(s.removal_summary() for s in sources))


class TrainStreamFactory:
    """Builds one shard's batch stream; called inside each DataLoader worker."""

    def __init__(self, cfg: DataConfig, tokenizer, micro_batch_size: int):
        self.cfg, self.tokenizer, self.micro_batch_size = cfg, tokenizer, micro_batch_size

    def __call__(self, shard: int, num_shards: int) -> Batches:
        docs = document_stream(self.cfg, split="train", shard=shard, num_shards=num_shards, loop=True,
                               tokenizer=self.tokenizer)
        return Batches(PackedStream(docs, self.tokenizer, self.cfg.seq_len), self.micro_batch_size)


def train_batches(cfg: DataConfig, tokenizer, micro_batch_size: int, shard: int = 0,
                  num_shards: int = 1, num_workers: int | None = None):
    """Endless training micro-batches for one rank (``shard`` of ``num_shards``).

    With ``num_workers`` (default ``data.num_workers``) > 0, DataLoader worker processes
    read disjoint sub-shards; either way the result has ``state_dict`` / ``load_state_dict``
    and resumes with exactly the batches an uninterrupted run would have produced.
    """
    factory = TrainStreamFactory(cfg, tokenizer, micro_batch_size)
    workers = getattr(cfg, "num_workers", 0) if num_workers is None else num_workers
    if workers and workers > 0:
        return StreamingLoader(factory, workers, rank=shard, world=num_shards)
    return factory(shard, num_shards)


def is_token_data(cfg: DataConfig) -> bool:
    """True when the sources are tokenized shards (``format: tokens``), read by position."""
    return any(src.format == "tokens" for src in cfg.sources)


def token_shards(cfg: DataConfig) -> list[TokenShards]:
    return [TokenShards(list(src.paths)) for src in cfg.sources]


def token_stream(cfg: DataConfig, split: str):
    """The windows of tokenized-shard sources: one source's ``TokenWindows``, or a
    ``TokenMixture`` by weight (token shares)."""
    streams = [TokenWindows(sh, cfg.seq_len, split, cfg.val_fraction, seed=cfg.seed + 7919 * i)
               for i, sh in enumerate(token_shards(cfg))]
    if len(streams) == 1 or split != "train":
        return streams[0] if len(streams) == 1 else _chain_windows(streams)
    return TokenMixture(streams, [src.weight for src in cfg.sources])


def _chain_windows(streams):
    for s in streams:
        yield from s


def validation_windows(cfg: DataConfig, tokenizer, max_windows: int) -> list[dict]:
    """The first ``max_windows`` packed windows of the held-out split: one global list,
    the same whatever the world size (the trainer splits it across ranks)."""
    if is_token_data(cfg):
        windows = token_stream(cfg, "val")
    else:
        windows = PackedStream(document_stream(cfg, split="val", loop=False, tokenizer=tokenizer), tokenizer,
                               cfg.seq_len)
    out = []
    for _ in range(max_windows):
        try:
            out.append(next(windows))
        except StopIteration:
            break
    return out


def documents(cfg: DataConfig) -> Iterator[Document]:
    """Every document that survives the steps, one pass, both splits."""
    return document_stream(cfg, split=None, loop=False)
