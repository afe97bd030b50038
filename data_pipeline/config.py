"""Structured config of the data path: where documents come from and which steps run.

Each step has its own typed block with ``enabled``; the order of steps is fixed by
``data_pipeline.pipeline.build_steps`` so users switch steps on and off and tune their
thresholds from the command line (``data.extract.main_content=false``) without
re-declaring a list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ExtractConfig:
    enabled: bool = True
    main_content: bool = True  # resiliparse main-content heuristics (drop nav/footers)
    max_replacement_ratio: float = 0.01  # drop decodes with >1% U+FFFD
    min_chars: int = 1


@dataclass
class SourceConfig:
    """One input source of a mixture."""

    name: str = "web"
    paths: list[str] = field(default_factory=list)
    format: str = "warc"  # warc | wet | jsonl | parquet | hf
    weight: float = 1.0
    text_key: str = "text"  # jsonl / parquet / hf column holding the text
    hf_name: Optional[str] = None  # for format=hf: dataset name (or local dir) and config
    hf_config: Optional[str] = None
    hf_split: str = "train"


@dataclass
class DataConfig:
    name: str = "sample"
    sources: list[SourceConfig] = field(default_factory=list)
    seq_len: int = 256
    val_fraction: float = 0.05  # share of documents held out (stable hash of the document id)
    val_max_sequences: int = 256  # cap on the validation set held in memory
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    seed: int = 1234
