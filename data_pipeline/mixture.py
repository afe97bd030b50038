"""Weighted mixture of document streams with token-share targets.

Weights are shares of *tokens*, not documents: a source of long books and a source of
short posts with equal weights should each give half the training tokens. Each draw
picks source ``i`` with probability proportional to ``w_i / mean_tokens_i`` (the running
mean document length of that source), so the expected token share of every source is
its weight whatever its document lengths; a source that falls more than two documents
behind its share is drawn next, which bounds the drift. The draws come from a ``random.Random(seed)``
whose state is checkpointed, so a run (and a resumed run) sees the same sequence.

Every source loops on its own (its ``DocumentStream`` has ``loop=True``): a small source
that runs out starts another epoch (upsampling) while the large ones carry on. With
``loop=False`` the mixture is one pass: exhausted sources drop out until all are done.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from data_pipeline.document import Document


def default_length(doc: Document) -> int:
    return max(1, len(doc.text.encode("utf-8", "replace")))


class MixtureStream:
    def __init__(self, streams: Sequence, weights: Sequence[float], names: Sequence[str] = (),
                 seed: int = 0, length_fn: Callable[[Document], int] = default_length, loop: bool = True):
        if len(streams) != len(weights) or not streams:
            raise ValueError("a mixture needs one weight per stream and at least one stream")
        if any(w <= 0 for w in weights):
            raise ValueError(f"mixture weights must be positive, got {list(weights)}")
        total = float(sum(weights))
        self.streams = list(streams)
        self.weights = [w / total for w in weights]
        self.names = list(names) or [f"source{i}" for i in range(len(streams))]
        self.length_fn, self.loop = length_fn, loop
        self.rng = random.Random(seed)
        self.tokens = [0] * len(streams)
        self.docs = [0] * len(streams)
        self.exhausted = [False] * len(streams)

    def __iter__(self):
        return self

    def _mean_len(self, i: int) -> float:
        if self.docs[i]:
            return self.tokens[i] / self.docs[i]
        seen = [t / d for t, d in zip(self.tokens, self.docs) if d]
        return sum(seen) / len(seen) if seen else 1.0

    def _pick(self) -> int:
        live = [i for i in range(len(self.streams)) if not self.exhausted[i]]
        if not live:
            raise StopIteration
        total = sum(self.tokens)
        # A source owed more than two of its average documents is drawn at once: this keeps
        # the realised shares within a few documents of the target instead of drifting
        # like a random walk, while most draws stay random.
        owed = {i: self.weights[i] * total - self.tokens[i] - 2 * self._mean_len(i) for i in live}
        behind = max(live, key=lambda i: owed[i])
        if owed[behind] > 0 and len(live) > 1:
            return behind
        p = [self.weights[i] / self._mean_len(i) for i in live]
        return self.rng.choices(live, weights=p)[0]

    def __next__(self) -> Document:
        while True:
            i = self._pick()
            try:
                doc = next(self.streams[i])
            except StopIteration:
                self.exhausted[i] = True
                continue
            self.docs[i] += 1
            self.tokens[i] += self.length_fn(doc)
            doc.metadata.setdefault("mixture_source", self.names[i])
            return doc

    def token_shares(self) -> dict[str, float]:
        total = sum(self.tokens) or 1
        return {n: t / total for n, t in zip(self.names, self.tokens)}

    @property
    def epoch(self) -> int:
        """Epochs completed by the slowest source (the one that is least upsampled)."""
        return min(getattr(s, "epoch", 0) for s in self.streams)

    @epoch.setter
    def epoch(self, value: int) -> None:
        for s in self.streams:
            s.epoch = value

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"epoch": self.epoch, "rng": [version, list(internal), gauss], "tokens": list(self.tokens),
                "doc_counts": list(self.docs), "exhausted": list(self.exhausted), "names": list(self.names),
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"mixture state is for sources {state['names']}, this mixture has {self.names}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.tokens, self.docs = list(state["tokens"]), list(state["doc_counts"])
        self.exhausted = list(state["exhausted"])
        for s, st in zip(self.streams, state["streams"]):
            s.load_state_dict(st)
