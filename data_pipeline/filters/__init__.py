"""Document filters: each is one small step with its own config block and stats."""

from data_pipeline.filters.langid import LanguageFilter
from data_pipeline.filters.quality import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from data_pipeline.filters.quality_model import QualityModelFilter
from data_pipeline.filters.safety import BadWordsFilter, PIIScrubber, URLFilter

__all__ = ["BadWordsFilter", "C4QualityFilter", "FineWebQualityFilter", "GopherQualityFilter",
           "GopherRepetitionFilter", "LanguageFilter", "PIIScrubber", "QualityModelFilter", "URLFilter"]
