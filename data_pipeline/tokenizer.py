"""SentencePiece BPE tokenizer: training and a small wrapper kiln uses everywhere.

Ids 0-3 are fixed (unk, bos, eos, pad) so every kiln model agrees on them; the chat
control tokens are reserved as user-defined symbols at training time so SFT never has to
resize embeddings. Byte fallback means no text is ever <unk>; digits are split one per
token (Llama's choice, which helps arithmetic).
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

UNK, BOS, EOS, PAD = 0, 1, 2, 3
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end_of_turn|>")


class Tokenizer:
    def __init__(self, path: str):
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.control = {t: self.sp.piece_to_id(t) for t in CHAT_TOKENS if self.sp.piece_to_id(t) != UNK}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def model_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


def _lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if line:
                yield line[:max_chars]


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int = 8192,
                    character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                    num_threads: int = 2) -> Tokenizer:
    """Train a BPE model on ``texts`` and write it atomically to ``out_path``."""
    lines = _lines(texts, 8192)
    try:
        first = next(lines)
    except StopIteration:  # SentencePiece would only say "INTERNAL: !sentences_.empty()"
        raise ValueError(f"no text to train the tokenizer {out_path} on: the training split produced no "
                         "document (check data.sources paths and formats, and the filters' data report)") from None
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        max_sentence_length=8192,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        user_defined_symbols=list(CHAT_TOKENS),
        unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        num_threads=num_threads,
        minloglevel=2,
    )
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, out_path)
    return Tokenizer(out_path)
