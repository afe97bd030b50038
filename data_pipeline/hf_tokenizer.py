"""kiln's SentencePiece tokenizer as a Hugging Face ``tokenizers`` tokenizer, for export.

The tokenizer is rebuilt as a ``tokenizers`` BPE model that reproduces SentencePiece's ids
exactly instead of going through ``LlamaTokenizer``, which assumes a dummy prefix that
kiln's tokenizer does not add; ``build_hf_tokenizer`` says why each setting is needed.
"""

from __future__ import annotations

import json
import os
import shutil

from model.hf_interop import CHAT_TEMPLATE_FILE, SPM_FILE

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _load_spm_proto(spm_path: str):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    with open(spm_path, "rb") as f:
        m.ParseFromString(f.read())
    return m


def build_hf_tokenizer(spm_path: str):
    """A ``tokenizers.Tokenizer`` that gives SentencePiece BPE's ids for every text.

    - model: BPE over the SentencePiece vocabulary (same ids), ``byte_fallback=True`` so
      characters outside the vocabulary become <0xNN> pieces as in SentencePiece. Merges
      are every split of a normal piece into two pieces, ranked by the merged piece's score
      (SentencePiece BPE merges the adjacent pair whose result scores highest).
    - normalizer: only " " -> "▁" (SentencePiece's whitespace escaping); kiln trains with
      identity normalization, no dummy prefix and no whitespace collapsing, so nothing
      else may touch the text. A precompiled charsmap or a dummy prefix, if a model has
      them, are reproduced too; whitespace collapsing is refused.
    - added tokens: user-defined symbols (the chat tokens) are matched anywhere in the text
      as SentencePiece does; they are *not* special, so ``skip_special_tokens`` keeps them
      in decoded text like ``sp.decode`` does. Control symbols (<unk> <s> </s> <pad>) are
      special; ``split_special_tokens=True`` in tokenizer_config.json keeps a literal
      "</s>" in a document from turning into EOS, which SentencePiece never does either.
    - no post-processor: kiln adds no BOS/EOS when encoding text.
    - decoder: "▁" -> " ", byte pieces -> UTF-8, no stripping of a leading space.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    m = _load_spm_proto(spm_path)
    if m.trainer_spec.model_type != 2:
        raise ValueError(f"{spm_path}: only SentencePiece BPE models can be converted "
                         f"(model_type={m.trainer_spec.model_type})")
    ns = m.normalizer_spec
    if ns.remove_extra_whitespaces:
        raise ValueError(f"{spm_path}: remove_extra_whitespaces=true cannot be reproduced exactly")
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    unk = m.pieces[m.trainer_spec.unk_id].piece
    normal = {p.piece: (p.score, i) for i, p in enumerate(m.pieces) if p.type == _NORMAL}
    merges = []
    for piece, (score, pid) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-score, pid, normal[left][1], normal[right][1], left, right))
    merges.sort()
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk,
                        fuse_unk=True, byte_fallback=True))
    norm = []
    if ns.precompiled_charsmap:
        norm.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend("▁"))
    norm.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(norm)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # Added in id order so each keeps its SentencePiece id.
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in m.pieces if p.type in (_CONTROL, _UNKNOWN)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in m.pieces if p.type == _USER_DEFINED])
    return tok


def save_hf_tokenizer(spm_path: str, out_dir: str, model_max_length: int,
                      chat_template: str | None = None) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model and
    (optionally) chat_template.jinja. ``tokenizer_class`` is PreTrainedTokenizerFast so
    ``AutoTokenizer`` loads tokenizer.json as is, rather than LlamaTokenizer rebuilding
    the pipeline with a dummy prefix (see the module docstring)."""
    m = _load_spm_proto(spm_path)
    tok = build_hf_tokenizer(spm_path)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(spm_path, os.path.join(out_dir, SPM_FILE))
    ts = m.trainer_spec

    def piece(i):
        return m.pieces[i].piece if 0 <= i < len(m.pieces) else None

    special = {"bos_token": piece(ts.bos_id), "eos_token": piece(ts.eos_id), "unk_token": piece(ts.unk_id),
               "pad_token": piece(ts.pad_id)}
    special = {k: v for k, v in special.items() if v is not None}
    added = {str(i): {"content": p.piece, "special": p.type != _USER_DEFINED, "normalized": False,
                      "lstrip": False, "rstrip": False, "single_word": False}
             for i, p in enumerate(m.pieces) if p.type in (_CONTROL, _UNKNOWN, _USER_DEFINED)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "added_tokens_decoder": added,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
        with open(os.path.join(out_dir, CHAT_TEMPLATE_FILE), "w", encoding="utf-8") as f:
            f.write(chat_template)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2, ensure_ascii=False)
