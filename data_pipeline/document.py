"""The unit that flows through a pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Document:
    """One document. ``text`` is empty until an extractor fills it from ``raw`` (bytes)."""

    id: str
    text: str = ""
    url: str = ""
    source: str = "web"
    raw: Optional[bytes] = None
    metadata: dict[str, Any] = field(default_factory=dict)
