"""Evaluation: perplexity and bits-per-byte are sums over every token of every held-out
document, so they are checked against a direct computation, not just for plausibility."""

import json
import math
import os
import sys

import hf_helpers
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.pipeline import document_stream
from data_pipeline.tokenizer import Tokenizer
from train.checkpoint.full_state import load_model

sys.path.insert(0, os.path.join(hf_helpers.REPO, "launch"))
from _common import TextTokenizer  # noqa: E402
from evaluate import data_config, score_texts  # noqa: E402

TEXTS = ["Short one.", "A somewhat longer document, with digits 1234 and ünïcödé, that spans windows. " * 2,
         "日本語 and\nnewlines\n\n"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    run_dir = hf_helpers.tiny_run(tmp_path_factory)
    model, step_dir = load_model(run_dir)
    tok = Tokenizer(os.path.join(step_dir, "tokenizer.model"))
    return run_dir, step_dir, model, tok


def _adapter(tok):
    return TextTokenizer(tok.encode, tok.decode, [tok.eos_id], tok.eos_id, tok.pad_id)


def _reference_nats(model, tok, text):
    """Log-loss of one document in a single forward pass: EOS, the text, EOS."""
    ids = torch.tensor([[tok.eos_id] + tok.encode(text) + [tok.eos_id]])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item(), ids.shape[1] - 1


def test_scores_equal_a_direct_computation(loaded):
    _, _, model, tok = loaded
    ref = [_reference_nats(model, tok, t) for t in TEXTS]
    r = score_texts(model, _adapter(tok), TEXTS, seq_len=128, batch_size=2, device="cpu")  # no doc is cut
    assert r["docs"] == 3 and r["tokens"] == sum(n for _, n in ref)
    assert math.isclose(r["nats"], sum(x for x, _ in ref), rel_tol=1e-5)
    assert r["bytes"] == sum(len(t.encode("utf-8")) for t in TEXTS) > sum(len(t) for t in TEXTS)
    assert math.isclose(r["bits_per_byte"], r["nats"] / math.log(2) / r["bytes"])
    assert math.isclose(r["perplexity"], math.exp(r["nats"] / r["tokens"]))
    # Short windows: the same tokens, each scored once, with less context (so different nats).
    w = score_texts(model, _adapter(tok), TEXTS, seq_len=8, batch_size=3, device="cpu")
    assert w["tokens"] == r["tokens"] and w["bytes"] == r["bytes"] and w["nats"] != r["nats"]


def test_evaluate_cli_on_the_validation_split(tmp_path, loaded):
    run_dir, step_dir, model, tok = loaded
    out = tmp_path / "eval.json"
    p = hf_helpers.launch("evaluate.py", run_dir, "--max-docs", "1", "--seq-len", "64", "--batch-size", "16",
                          "--out", str(out))
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == result
    assert result["model"] == step_dir and result["split"] == "val" and result["docs"] == 1
    # The same document, found independently through the pipeline with the run's config.
    docs = [d.text for _, d in zip(range(1), document_stream(data_config(step_dir, []), split="val", loop=False))]
    assert result["bytes"] == sum(len(t.encode("utf-8")) for t in docs)
    assert result["tokens"] == sum(len(tok.encode(t)) + 1 for t in docs)
    expected = score_texts(model, _adapter(tok), docs, seq_len=64, batch_size=32, device="cpu")
    assert math.isclose(result["nats"], expected["nats"], rel_tol=1e-5)
    assert math.isclose(result["bits_per_byte"], result["nats"] / math.log(2) / result["bytes"])
    assert math.isclose(result["perplexity"], math.exp(result["loss"]))
    # A two-step model is near uniform over the vocabulary: loss close to ln(V).
    assert abs(result["loss"] - math.log(model.cfg.vocab_size)) < 0.5


def test_evaluate_cli_rejects_unknown_options_with_exit_2_naming_them(loaded, capsys):
    from evaluate import main

    for argv, named in ((["--max-doc", "2"], "unrecognized arguments: --max-doc"),  # no abbreviations
                        (["--max-docs", "two"], "argument --max-docs: invalid int value: 'two'"),
                        (["max_docs=2"], "argument 'max_docs=2' is not a data=<group> or data.<key>=<value>")):
        with pytest.raises(SystemExit) as e:
            main([loaded[0], *argv])
        assert e.value.code == 2 and named in capsys.readouterr().err


def test_evaluate_cli_data_overrides_after_flags_reach_the_data_config(loaded, capsys):
    """data.<key>=<value> words may follow the flags: with no document held out, nothing to score."""
    from evaluate import main

    assert main([loaded[0], "--max-docs", "1", "data.val_fraction=0.0"]) == 1
    assert "data.val_fraction=0.0" in capsys.readouterr().err
