"""Readers turn files into a stream of documents and remember where they are."""

from data_pipeline.readers.base import Reader, expand_paths
from data_pipeline.readers.hf import HFReader
from data_pipeline.readers.jsonl import JsonlReader
from data_pipeline.readers.parquet import ParquetReader
from data_pipeline.readers.warc import WarcReader

__all__ = ["HFReader", "JsonlReader", "ParquetReader", "Reader", "WarcReader", "expand_paths"]
