"""HTML to plain text with resiliparse, with charset detection and encoding checks."""

from __future__ import annotations

import re

from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding
from resiliparse.parse.html import HTMLTree

from data_pipeline.document import Document
from data_pipeline.step import PipelineStep
from data_pipeline.text import CODE_LINES, fenced_code_lines

_CHARSET = re.compile(r"charset=([\w\-:.]+)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # Unicode category Cc minus \t \n \r


class HtmlExtractor(PipelineStep):
    """Decode ``doc.raw`` and keep the main content as text.

    The charset comes from the HTTP header when it names a codec Python knows, else from
    resiliparse's detector. Payloads that look binary (NUL bytes, mostly non-printable)
    or that decode to more than ``max_replacement_ratio`` U+FFFD characters are dropped
    with a reason rather than fed to the model as mojibake.
    """

    name = "html_extract"

    def __init__(self, main_content: bool = True, max_replacement_ratio: float = 0.01,
                 max_control_ratio: float = 0.01, min_chars: int = 1, mark_code: bool = False):
        super().__init__()
        # Mark the lines of <pre> blocks (text documents: ``` fences) as code, so the quality
        # heuristics judge the prose and the code stays in the text (data_pipeline.text.prose_of).
        self.mark_code = mark_code
        self.main_content = main_content
        self.max_replacement_ratio = max_replacement_ratio
        self.max_control_ratio = max_control_ratio
        self.min_chars = min_chars

    def process(self, doc: Document):
        if doc.raw is None:  # already text (WET, JSONL, ...): only the sanity checks
            if _CONTROL.search(doc.text) and len(_CONTROL.findall(doc.text)) > self.max_control_ratio * len(doc.text):
                return "binary"
            doc.text = doc.text.replace("\x00", "")
            if self.mark_code:
                self._mark(doc, fenced_code_lines(doc.text))
            return doc if doc.text.strip() else "no_text"
        raw = doc.raw
        head = raw[:4096]
        if b"\x00" in head:
            return "binary"
        html = decode_html(raw, doc.metadata.get("content_type", ""))
        if html is None:
            return "bad_encoding"
        text = extract_plain_text(html, main_content=self.main_content, alt_texts=False,
                                  links=False, form_fields=False, noscript=False)
        text = text.replace("\x00", "")
        if len(text.strip()) < self.min_chars:
            return "no_text"
        if text.count("\ufffd") > self.max_replacement_ratio * len(text):
            return "bad_encoding"
        controls = len(_CONTROL.findall(text))
        if controls > self.max_control_ratio * len(text):
            return "binary"
        doc.text = text
        doc.raw = None
        if self.mark_code:
            tree = HTMLTree.parse(html)
            pre = tree.body.query_selector_all("pre") if tree.body is not None else []
            self._mark(doc, {ln.strip() for block in pre for ln in block.text.split("\n") if ln.strip()})
        return doc

    @staticmethod
    def _mark(doc: Document, lines: set[str]) -> None:
        present = {ln.strip() for ln in doc.text.split("\n")} & lines
        if present:
            doc.metadata[CODE_LINES] = frozenset(present)


def decode_html(raw: bytes, content_type: str) -> str | None:
    """Bytes to str. Returns None if no codec gives a sane decode."""
    m = _CHARSET.search(content_type or "")
    candidates = []
    if m:
        candidates.append(m.group(1).strip("\"'"))
    candidates.append(detect_encoding(raw))
    for enc in candidates:
        try:
            text = raw.decode(enc)
            return text
        except (LookupError, UnicodeDecodeError):
            continue
    # Last resort: resiliparse's lenient conversion (replaces undecodable bytes).
    return bytes_to_str(raw, candidates[-1])
