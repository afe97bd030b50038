"""Fine-tuning records from JSONL, Parquet or a local Hugging Face dataset, checked one by one.

Every record is normalised to a conversation (``messages``) or, for classification, to
``(text, label)``, and remembers where it came from (``file:line`` for JSONL, ``file row N``
otherwise). A malformed record -- missing or non-string field, unknown role, empty answer,
a control-token string inside content -- is a ``BadRecord`` naming that place; with
``sft.skip_bad_records=true`` it is counted by reason and skipped instead, never silently.

Accepted shapes (``sft.format=auto`` picks per record by its keys):
- alpaca: ``instruction``, optional ``input``, ``output`` (+ optional ``system``)
- chat: ``{"messages": [{"role": "system|user|assistant", "content": "..."}]}`` (OpenAI style)
- prompt_completion: ``prompt``, ``completion``
- classification: ``sft.text_key`` / ``sft.label_key`` (default ``text`` / ``label``)
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from train.sft.chat import CONTROL_STRINGS, ROLES


class BadRecord(ValueError):
    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason} (set sft.skip_bad_records=true to skip and count such records)")
        self.where, self.reason = where, reason


@dataclass
class Record:
    where: str
    messages: list[dict] | None = None
    text: str | None = None
    label: Any = None


def raw_records(path: str, source: str = "auto", hf_split: str = "train") -> Iterator[tuple[str, Any]]:
    """(location, raw record) for every record of one file or dataset directory."""
    kind = source
    if kind == "auto":
        kind = "hf" if os.path.isdir(path) else "parquet" if path.endswith(".parquet") else "jsonl"
    if kind == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", BadRecord(f"{path}:{n}", f"invalid JSON ({e.msg})")
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {n}", row
    elif kind == "hf":
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if hf_split not in ds:
                raise ValueError(f"{path}: no split {hf_split!r} (has {list(ds)}); set sft.hf_split")
            ds = ds[hf_split]
        for n, row in enumerate(ds):
            yield f"{path} row {n}", row
    else:
        raise ValueError(f"sft.source: unknown source {source!r}")


def _text(rec: dict, key: str, where: str, required: bool = True, name: str | None = None) -> str:
    v = rec.get(key)
    key = name or key
    if v is None:
        if required:
            raise BadRecord(where, f"missing field {key!r}")
        return ""
    if not isinstance(v, str):
        raise BadRecord(where, f"field {key!r} must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise BadRecord(where, f"field {key!r} is empty")
    return v


def detect_format(rec: dict) -> str | None:
    if "messages" in rec:
        return "chat"
    if "instruction" in rec or "output" in rec:
        return "alpaca"
    if "prompt" in rec or "completion" in rec:
        return "prompt_completion"
    return None


def to_messages(rec: Any, fmt: str, where: str) -> list[dict]:
    if not isinstance(rec, dict):
        raise BadRecord(where, f"a record must be an object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = detect_format(rec) or ""
        if not fmt:
            raise BadRecord(where, f"cannot tell the format from keys {sorted(rec)} (messages | instruction/output "
                            "| prompt/completion)")
    if fmt == "alpaca":
        instruction, inp = _text(rec, "instruction", where), _text(rec, "input", where, required=False)
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        system = _text(rec, "system", where, required=False)
        msgs = ([{"role": "system", "content": system}] if system.strip() else [])
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec, "output", where)}]
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _text(rec, "prompt", where)},
                {"role": "assistant", "content": _text(rec, "completion", where)}]
    elif fmt == "chat":
        raw = rec.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRecord(where, "field 'messages' must be a non-empty list")
        msgs = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict):
                raise BadRecord(where, f"messages[{i}] must be an object")
            role = m.get("role")
            if role not in ROLES:
                raise BadRecord(where, f"messages[{i}]: wrong role {role!r} (system | user | assistant)")
            if role == "system" and i != 0:
                raise BadRecord(where, f"messages[{i}]: a system message may only come first")
            content = _text(m, "content", where, required=role == "assistant", name=f"messages[{i}].content")
            msgs.append({"role": role, "content": content})
    else:
        raise BadRecord(where, f"format {fmt!r} is not a conversation format")
    for m in msgs:
        bad = [t for t in CONTROL_STRINGS if t in m["content"]]
        if bad:
            raise BadRecord(where, f"{m['role']} content contains the control token {bad[0]} (turn injection)")
    return msgs


def to_classification(rec: Any, text_key: str, label_key: str, where: str) -> tuple[str, Any]:
    if not isinstance(rec, dict):
        raise BadRecord(where, f"a record must be an object, got {type(rec).__name__}")
    text = _text(rec, text_key, where)
    label = rec.get(label_key)
    if label is None or (isinstance(label, str) and not label.strip()):
        raise BadRecord(where, f"missing field {label_key!r}")
    if not isinstance(label, (str, int)) or isinstance(label, bool):
        raise BadRecord(where, f"field {label_key!r} must be a string or an integer, got {type(label).__name__}")
    return text, label


class SkipCounter:
    """Bad records skipped under sft.skip_bad_records, by reason, with a first example each."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.reasons: Counter = Counter()
        self.examples: dict[str, str] = {}

    def handle(self, err: BadRecord) -> None:
        if not self.skip:
            raise err
        key = err.reason.split(" (")[0]
        self.reasons[key] += 1
        self.examples.setdefault(key, err.where)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())


def read_records(paths, s, classification: bool, skipped: SkipCounter) -> list[Record]:
    """Every good record of ``paths`` (config block ``s`` = cfg.sft), in file order."""
    out = []
    for path in paths:
        for where, rec in raw_records(str(path), s.source, s.hf_split):
            try:
                if isinstance(rec, BadRecord):
                    raise rec
                if classification:
                    text, label = to_classification(rec, s.text_key, s.label_key, where)
                    out.append(Record(where, text=text, label=label))
                else:
                    out.append(Record(where, messages=to_messages(rec, s.format, where)))
            except BadRecord as e:
                skipped.handle(e)
    return out
