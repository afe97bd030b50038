"""A learned quality filter: a fastText-style linear classifier over hashed word n-grams.

The heuristics catch what their authors thought of; a model trained on pages people
labelled (the shipped sample's labels: ``data_pipeline/labelled_pages.py``; or any JSONL of
text + label) generalises from their judgements, as FineWeb-Edu's and DCLM's classifiers
do, instead of reproducing a filter chain's decisions. Like fastText (Joulin et al. 2017)
it is a linear model on hashed unigrams and bigrams of the lower-cased words: here a
logistic regression on the set of a document's n-grams, scaled by 1/sqrt(their number) so
long and short pages weigh alike. Why this model: it trains in seconds and scores every
page of a crawl on a CPU, needs no download (kiln never fetches weights), and on the
shipped labels it already separates every junk page from every good one on held-out
pages (README, "A learned quality filter"), so a small embedding model would buy nothing
measurable here. ``launch/train_quality_model.py`` trains it, chooses the threshold on a
validation split and stores it in the model file, a safetensors file (weights and
settings), so loading it runs no code.
"""

from __future__ import annotations

import json

import numpy as np
import xxhash

from data_pipeline.document import Document
from data_pipeline.step import Filter
from data_pipeline.text import words_of


class QualityModel:
    def __init__(self, buckets: int = 1 << 18, ngrams: int = 2, weights: np.ndarray | None = None,
                 bias: float = 0.0, threshold: float | None = None):
        self.buckets, self.ngrams = buckets, ngrams
        self.weights = np.zeros(buckets, dtype=np.float32) if weights is None else weights.astype(np.float32)
        self.bias = float(bias)
        self.threshold = threshold  # P(keep) to keep at, chosen on a validation split when trained

    def features(self, text: str) -> np.ndarray:
        """The distinct bucket ids of the document's word n-grams (n = 1 .. ngrams)."""
        words = [w.lower() for w in words_of(text) if w[0].isalnum()]
        grams = {" ".join(words[i:i + n]) for n in range(1, self.ngrams + 1) for i in range(len(words) - n + 1)}
        return np.unique(np.fromiter((xxhash.xxh64_intdigest(g.encode()) % self.buckets for g in grams),
                                     dtype=np.int64, count=len(grams)))

    def _logit(self, feats: np.ndarray) -> float:
        return float(self.weights[feats].sum()) / np.sqrt(len(feats)) + self.bias if len(feats) else self.bias

    def score(self, text: str) -> float:
        """P(keep) for ``text``."""
        return 1.0 / (1.0 + np.exp(-self._logit(self.features(text))))

    def fit(self, texts: list[str], labels: list[int], epochs: int = 20, lr: float = 0.5,
            seed: int = 0, balanced: bool = False) -> QualityModel:
        """Plain SGD on the logistic loss, documents in a seeded random order each epoch.
        ``balanced`` weighs each class by the inverse of its share, so that a few junk pages
        among many good ones (the shipped sample: 20 against 228) are not outvoted."""
        feats = [self.features(t) for t in texts]
        y = np.asarray(labels, dtype=np.float64)
        w = np.ones(len(y))
        if balanced and 0 < y.sum() < len(y):
            pos = y.mean()
            w = np.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            for i in rng.permutation(len(feats)):
                f = feats[i]
                g = (1.0 / (1.0 + np.exp(-self._logit(f))) - y[i]) * w[i]
                if len(f):  # the ids are distinct: plain indexing adds once per id
                    self.weights[f] -= np.float32(lr * g / np.sqrt(len(f)))
                self.bias -= lr * g
        return self

    def save(self, path: str) -> None:
        from safetensors.numpy import save_file

        save_file({"weights": self.weights}, path,
                  metadata={"kiln_quality_model": json.dumps({"buckets": self.buckets, "ngrams": self.ngrams,
                                                              "bias": self.bias, "threshold": self.threshold})})

    @classmethod
    def load(cls, path: str) -> QualityModel:
        from safetensors import safe_open

        with safe_open(path, "np") as f:
            meta = json.loads((f.metadata() or {}).get("kiln_quality_model", "null") or "null")
            if meta is None:
                raise ValueError(f"{path} is not a kiln quality model (launch/train_quality_model.py writes one)")
            threshold = meta.get("threshold")
            if threshold is not None and not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
                # The stored threshold is used whenever data.quality_model.threshold is null: a
                # value outside [0, 1] would keep every page or none, silently.
                raise ValueError(f"{path}: the stored threshold must be in [0, 1] or null, got {threshold!r} "
                                 "(retrain with launch/train_quality_model.py)")
            return cls(meta["buckets"], meta["ngrams"], f.get_tensor("weights"), meta["bias"], threshold)


class QualityModelFilter(Filter):
    """Drops documents the quality model scores below ``threshold`` (P(keep)); None: the
    threshold stored in the model (chosen on its validation split), else 0.5."""

    name = "quality_model"

    def __init__(self, model_path: str | None = None, threshold: float | None = None,
                 replace_heuristics: bool = False):
        super().__init__()
        if not model_path:
            raise ValueError("config error: data.quality_model.model_path: the step needs a model "
                             "(make one with launch/train_quality_model.py)")
        self.model = QualityModel.load(model_path)
        if threshold is None:
            threshold = self.model.threshold if self.model.threshold is not None else 0.5
        self.threshold = threshold

    def reject(self, doc: Document) -> str | None:
        score = self.model.score(doc.text)
        doc.metadata["quality_score"] = round(score, 4)
        if score < self.threshold:
            return self.decided("quality_model_low_score", score, self.threshold)
        return None
