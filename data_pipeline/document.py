"""The unit that flows through a pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document. ``text`` is empty until an extractor fills it from ``raw`` (bytes)."""

    id: str
    text: str = ""
    url: str = ""
    source: str = "web"
    raw: bytes | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
