"""Safety steps: URL blocklist, bad-words ratio and PII scrubbing.

The URL filter runs before HTML extraction because it needs only the URL and saves the
cost of parsing pages that would be dropped anyway (FineWeb puts it first for that reason).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from data_pipeline.document import Document
from data_pipeline.step import Filter, PipelineStep
from data_pipeline.text import words_of

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def read_list(path: str) -> set[str]:
    """One entry per line, lower-cased; blank lines and ``#`` comments ignored."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip().lower()
            if line:
                out.add(line)
    return out


def _lists(shipped: str, user_file: str | None, use_shipped: bool) -> set[str]:
    items = read_list(os.path.join(ASSETS, shipped)) if use_shipped else set()
    if user_file:
        items |= read_list(os.path.expanduser(user_file))
    return items


URL_CATEGORIES = ("adult", "gambling")  # shipped as blocklist_<category>_{domains,url_words}.txt


class URLFilter(Filter):
    """Drops documents whose domain (or a parent domain) is blocklisted, or whose URL host
    or path contains a blocklisted word as a token. Token matching (not substring) keeps
    e.g. ``essex.ac.uk`` while dropping ``free-sex-videos.example``. The reason names the
    list's category (``url_adult_domain``, ``url_gambling_word``; a user's own files:
    ``url_blocked_...``), so the data report says what kind of page went."""

    name = "url_filter"

    def __init__(self, use_shipped_lists: bool = True, domains_file: str | None = None,
                 words_file: str | None = None, categories: Sequence[str] = URL_CATEGORIES):
        super().__init__()
        unknown = [c for c in categories if c not in URL_CATEGORIES]
        if unknown:
            raise ValueError(f"config error: data.url_filter.categories: unknown {unknown}; shipped: "
                             f"{list(URL_CATEGORIES)}")
        self.lists = [(c, read_list(os.path.join(ASSETS, f"blocklist_{c}_domains.txt")),
                       read_list(os.path.join(ASSETS, f"blocklist_{c}_url_words.txt")))
                      for c in (categories if use_shipped_lists else ())]
        user_domains = read_list(os.path.expanduser(domains_file)) if domains_file else set()
        user_words = read_list(os.path.expanduser(words_file)) if words_file else set()
        if user_domains or user_words:
            self.lists.append(("blocked", user_domains, user_words))

    def reject(self, doc: Document) -> str | None:
        if not doc.url:
            return None
        try:
            parts = urlsplit(doc.url.strip().lower())
        except ValueError:
            return "url_malformed"
        host = (parts.hostname or "").rstrip(".")
        labels = host.split(".")
        suffixes = {".".join(labels[i:]) for i in range(len(labels) - 1)}
        tokens = set(re.split(r"[^a-z]+", host + " " + parts.path))
        for category, domains, _ in self.lists:
            if suffixes & domains:
                return f"url_{category}_domain"
        for category, _, words in self.lists:
            if tokens & words:
                return f"url_{category}_word"
        return None


class BadWordsFilter(Filter):
    """Drops documents whose share of obscene words exceeds ``max_ratio``. C4 drops a page
    on any listed word (``max_ratio=0``); a small positive ratio keeps pages that merely
    mention one (medical, literary) while still catching adult spam."""

    name = "bad_words"

    def __init__(self, max_ratio: float = 0.0, use_shipped_lists: bool = True, words_file: str | None = None):
        super().__init__()
        self.max_ratio = max_ratio
        self.words = _lists("bad_words_en.txt", words_file, use_shipped_lists)

    def reject(self, doc: Document) -> str | None:
        words = [w.lower() for w in words_of(doc.text) if w[0].isalnum()]
        if not words:
            return None
        bad = sum(w in self.words for w in words)
        if bad and bad / len(words) > self.max_ratio:
            return self.decided("bad_words", bad / len(words), self.max_ratio)
        return None


EMAIL_RE = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[a-zA-Z]{2,}\b")
IPV4_RE = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\d|\.\d)")


class PIIScrubber(PipelineStep):
    """Replaces e-mail addresses and IPv4 addresses with placeholders (as FineWeb does before
    release), so a model cannot memorise contact data. It never drops a document; the
    number of replacements goes to ``doc.metadata['pii_replaced']``."""

    name = "pii"

    def __init__(self, emails: bool = True, ip_addresses: bool = True,
                 email_placeholder: str = "<EMAIL>", ip_placeholder: str = "<IP_ADDRESS>"):
        super().__init__()
        self.emails, self.ip_addresses = emails, ip_addresses
        self.email_placeholder, self.ip_placeholder = email_placeholder, ip_placeholder
        self.replaced = 0

    def process(self, doc: Document):
        text, n = doc.text, 0
        if self.emails:
            text, k = EMAIL_RE.subn(self.email_placeholder, text)
            n += k
        if self.ip_addresses:
            text, k = IPV4_RE.subn(self.ip_placeholder, text)
            n += k
        if n:
            doc.metadata["pii_replaced"] = n
            self.replaced += n
        doc.text = text
        return doc
