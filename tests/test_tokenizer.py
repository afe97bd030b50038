from data_pipeline.tokenizer import BOS, CHAT_TOKENS, EOS, PAD, UNK

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return {'a': x ** 2}  # comment\n\n\ttabbed",
    "Zahlen 1234567890 und Umlaute äöüß; 日本語のテキスト; emoji 🙂",
    "  leading and trailing spaces  ",
    "",
]


def test_decode_of_encode_is_identity_on_varied_text_without_the_space_marker(tokenizer):
    for text in TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unknown_characters_fall_back_to_bytes_not_unk(tokenizer):
    ids = tokenizer.encode("ꙮ𝔘𝔫𝔦𝔠𝔬𝔡𝔢")
    assert UNK not in ids
    assert tokenizer.decode(ids) == "ꙮ𝔘𝔫𝔦𝔠𝔬𝔡𝔢"


def test_digits_are_split_one_per_token(tokenizer):
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("2024")]
    assert pieces == ["2", "0", "2", "4"]


def test_special_ids_are_fixed_and_chat_tokens_reserved(tokenizer):
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (UNK, BOS, EOS, PAD)
    assert set(tokenizer.control) == set(CHAT_TOKENS)
    for tok, i in tokenizer.control.items():
        assert tokenizer.encode(tok) == [i]  # one id, never split
    assert tokenizer.encode("hi", bos=True, eos=True)[0] == BOS
    assert tokenizer.encode("hi", bos=True, eos=True)[-1] == EOS


def test_training_twice_gives_the_same_model(tokenizer_path, tmp_path):
    from data_pipeline.tokenizer import train_tokenizer

    texts = ["alpha beta gamma delta " * 20, "epsilon zeta eta theta " * 20] * 20
    a = train_tokenizer(texts, str(tmp_path / "a.model"), vocab_size=300)
    b = train_tokenizer(texts, str(tmp_path / "b.model"), vocab_size=300)
    assert a.model_bytes() == b.model_bytes()
    assert a.vocab_size == 300


def test_training_on_no_text_says_why_instead_of_a_sentencepiece_internal_error(tmp_path):
    import pytest

    from data_pipeline.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="produced no document"):
        train_tokenizer(iter(["", "  \n "]), str(tmp_path / "tok.model"), vocab_size=300)
    assert not (tmp_path / "tok.model").exists()


def test_tokenizer_training_on_a_stream_that_filters_everything_names_the_reasons(tmp_path):
    import gzip
    import json

    import pytest

    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.pipeline import iter_texts
    from data_pipeline.tokenizer import train_tokenizer

    path = tmp_path / "tiny.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(5):
            f.write(json.dumps({"id": str(i), "body": "no text field"}) + "\n")  # each record is malformed
    cfg = DataConfig(sources=[SourceConfig(format="jsonl", paths=[str(path)])])
    with pytest.raises(ValueError) as e:
        train_tokenizer(iter_texts(cfg, 100), str(tmp_path / "tok.model"), vocab_size=300)
    msg = str(e.value)
    assert "produced no document" in msg and "kept 0/5" in msg and "removed:" in msg, msg


def test_train_tokenizer_script_leaves_the_run_directory_config_alone(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("the: training run's config\n")
    script = os.path.join(REPO, "launch", "train_tokenizer.py")
    p = subprocess.run([sys.executable, script, f"run_dir={run}", "tokenizer.vocab_size=400",
                        "tokenizer.train_max_docs=20"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (run / "tokenizer.model").exists()
    assert (run / ".hydra" / "config.yaml").read_text() == "the: training run's config\n"
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def _random_texts(seed: int, n: int) -> list[str]:
    """Seeded random strings: half from a small alphabet dense in what tokenizers get wrong
    (U+2581, runs of whitespace, CR, literal special-token text, chat tokens, byte-fallback
    characters), half from random code points anywhere in Unicode."""
    import random

    rng = random.Random(seed)
    alphabet = list("ab \u2581\n\t  xyz.01<>|/s") + ["<|user|>", "</s>", "<s>", "é", "日", "😀", "\u00a0", "\r", "\u200b"]
    texts = []
    for i in range(n):
        k = rng.randint(0, 30)
        if i % 2:
            texts.append("".join(rng.choice(alphabet) for _ in range(k)))
        else:  # surrogates cannot be encoded as UTF-8; put U+2581 in their place
            cps = (rng.randint(1, 0x10FFFF) for _ in range(k))
            texts.append("".join(chr(0x2581 if 0xD800 <= c <= 0xDFFF else c) for c in cps))
    return texts


def test_round_trip_holds_exactly_up_to_the_whitespace_marker_in_kiln_and_the_hf_export(tokenizer, tmp_path):
    """The claim of docs/hf_interop.md, attacked with 3,000 seeded random strings: the
    exported HF tokenizer gives kiln's ids for every text, and both decode them to the text
    with each U+2581 ("▁", SentencePiece's space marker) read as a space, and to the text
    itself when it has no U+2581. A literal U+2581 and a space get the same ids, so no
    tokenizer can tell them apart on decode."""
    from transformers import AutoTokenizer

    from data_pipeline.hf_tokenizer import save_hf_tokenizer

    save_hf_tokenizer(tokenizer.path, str(tmp_path), model_max_length=512)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    texts = _random_texts(seed=0, n=3000)
    with_marker = [t for t in texts if "\u2581" in t]
    assert len(with_marker) > 500  # the marker is exercised
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, repr(text)
        decoded = tokenizer.decode(ids)
        assert hf.decode(ids) == decoded, repr(text)
        assert decoded == text.replace("\u2581", " "), repr(text)
    # The narrowing is needed: the marker and a space are the same ids.
    assert tokenizer.encode("a\u2581b") == tokenizer.encode("a b")
