"""Readers turn files into a stream of documents and remember where they are."""

from data_pipeline.readers.base import Reader, expand_paths
from data_pipeline.readers.warc import WarcReader

__all__ = ["Reader", "WarcReader", "expand_paths"]
