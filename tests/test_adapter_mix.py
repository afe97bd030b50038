"""Adapter mixing: a blend is the weighted sum of the adapters' deltas, at run time, as one
rank-concatenated adapter and merged into plain weights; switching per request needs no reload."""

from __future__ import annotations

import os

import pytest
import torch

from model.adapter_mix import add_blended_adapter, current, set_blend, using
from model.llama import ModelConfig, Transformer, generate
from model.lora import add_lora, merged_state_dict, set_active_adapter

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
X = torch.randint(4, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def two():
    """A base with adapter ``a`` (rank 4, every projection) and ``b`` (rank 2, wq and wv only),
    both trained-looking (B off zero); and the base's own weights, kept aside."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    base = {n: t.clone() for n, t in model.state_dict().items()}
    add_lora(model, "a", rank=4, alpha=8)
    add_lora(model, "b", rank=2, alpha=8, targets=["wq", "wv"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model, base


def deltas(model, name):
    """Each adapter's delta, from its factors and alpha/rank as the paper defines it."""
    params = dict(model.named_parameters())
    out = {}
    for n in params:
        if n.endswith(f".lora_A_{name}"):
            a, b = params[n], params[n.replace("lora_A_", "lora_B_")]
            out[n.replace(f".lora_A_{name}", ".weight")] = (b @ a).detach() * (8 / a.shape[0])
    return out


def plain_with(base, *weighted):
    """A plain Transformer whose weights are the base plus sum_i w_i * delta_i."""
    state = dict(base)
    for w, d in weighted:
        for n, t in d.items():
            state[n] = state[n] + w * t
    model = Transformer(CFG).eval()
    model.load_state_dict(state)
    return model


@torch.no_grad()
def test_weights_one_zero_is_adapter_a_alone(two):
    model, _ = two
    set_active_adapter(model, "a")
    alone = model(X)[0]
    set_blend(model, {"a": 1.0, "b": 0.0})
    assert current(model) == {"a": 1.0, "b": 0.0}
    assert torch.equal(model(X)[0], alone)
    set_blend(model, {"a": 0.0, "b": 1.0})
    assert (model(X)[0] - alone).abs().max() > 1e-3  # b is another model


@torch.no_grad()
def test_half_half_is_the_mean_of_the_deltas_at_run_time_merged_and_as_one_adapter(two):
    model, base = two
    mean = plain_with(base, (0.5, deltas(model, "a")), (0.5, deltas(model, "b")))(X)[0]
    set_blend(model, {"a": 0.5, "b": 0.5})
    torch.testing.assert_close(model(X)[0], mean, atol=1e-5, rtol=1e-5)

    merged = Transformer(CFG).eval()
    merged.load_state_dict(merged_state_dict(model, {"a": 0.5, "b": 0.5}), strict=True)
    torch.testing.assert_close(merged(X)[0], mean, atol=1e-5, rtol=1e-5)

    names = add_blended_adapter(model, "ab", {"a": 0.5, "b": 0.5})
    ranks = {n: p.shape[0] for n, p in model.named_parameters() if n.endswith(".lora_A_ab")}
    assert set(ranks) <= {n for n in names} and ranks["layers.0.attn.wq.lora_A_ab"] == 4 + 2  # concatenated
    assert ranks["layers.0.attn.wk.lora_A_ab"] == 4  # b does not target wk
    set_active_adapter(model, "ab")
    torch.testing.assert_close(model(X)[0], mean, atol=1e-5, rtol=1e-5)
    set_active_adapter(model, None)
    assert (model(X)[0] - mean).abs().max() > 1e-3


@torch.no_grad()
def test_switching_per_request_keeps_the_base_and_restores_the_routing(two):
    model, base = two
    want = {spec: plain_with(base, *w)(X)[0] for spec, w in
            (("a", [(1.0, deltas(model, "a"))]), ("b", [(1.0, deltas(model, "b"))]), (None, []))}
    ptr = model.layers[0].attn.wq.weight.data_ptr()
    set_active_adapter(model, "b")
    for spec in ("a", None, "b", "a"):
        with using(model, spec):
            torch.testing.assert_close(model(X)[0], want[spec], atol=1e-5, rtol=1e-5)
        assert current(model) == "b"
    with using(model, {"a": 2.0, "b": -1.0}):
        two_minus_one = plain_with(base, (2.0, deltas(model, "a")), (-1.0, deltas(model, "b")))(X)[0]
        torch.testing.assert_close(model(X)[0], two_minus_one, atol=1e-4, rtol=1e-4)
    assert model.layers[0].attn.wq.weight.data_ptr() == ptr  # the base was never copied or reloaded
    with pytest.raises(KeyError, match="no adapter named"):
        set_blend(model, {"a": 0.5, "c": 0.5})


@torch.no_grad()
def test_merging_without_naming_an_adapter_merges_the_blend_set(two):
    """merged_state_dict's default is what the model computes: with a (0.5, 0.5) blend set
    (no adapter active) that is base + mean of the deltas, not the bare base."""
    model, base = two
    set_blend(model, {"a": 0.5, "b": 0.5})
    merged = merged_state_dict(model)
    expected = plain_with(base, (0.5, deltas(model, "a")), (0.5, deltas(model, "b"))).state_dict()
    assert merged.keys() == expected.keys()
    for n, t in expected.items():
        torch.testing.assert_close(merged[n], t, atol=1e-6, rtol=0)
    assert (merged["layers.0.attn.wq.weight"] - base["layers.0.attn.wq.weight"]).abs().max() > 1e-3
    assert (merged["layers.0.mlp.w1.weight"] - base["layers.0.mlp.w1.weight"]).abs().max() > 1e-3  # a's half alone
    set_active_adapter(model, "b")  # and an active adapter is still merged alone
    b_only = plain_with(base, (1.0, deltas(model, "b"))).state_dict()
    torch.testing.assert_close(merged_state_dict(model)["layers.0.attn.wq.weight"], b_only["layers.0.attn.wq.weight"],
                               atol=1e-6, rtol=0)


@torch.no_grad()
def test_generation_with_a_blend_is_the_merged_blends_generation(two):
    model, base = two
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = plain_with(base, (0.3, deltas(model, "a")), (0.7, deltas(model, "b")))
    with using(model, {"a": 0.3, "b": 0.7}):
        out = generate(model, prompts, 8, temperature=0.0)
    assert torch.equal(out, generate(plain, prompts, 8, temperature=0.0))


def test_merge_lora_blend_writes_the_blend_as_plain_weights(tmp_path_factory, tokenizer_path, tmp_path, capsys):
    """Two adapter runs on one base, merged with --blend 0.5/0.5: the merged checkpoint gives
    the logits of the run-time blend of the two adapters on the base."""
    import sys

    from model.adapter_mix import set_blend
    from tests.conftest import REPO
    from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
    from train import checkpoint as ckpt
    from train.checkpoint.full_state import load_weights, read_init_weights
    from train.sft.adapters import add_adapter_from, load_base
    from train.sft.trainer import SFTTrainer

    base = tiny_checkpoint(tmp_path_factory, tokenizer_path)
    lora = ["lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.max_steps=2", "checkpoint.every=2"]
    SFTTrainer(sft_cfg(tmp_path / "a", base, [chat_file(tmp_path, 16, seed=1)], *lora)).fit()
    SFTTrainer(sft_cfg(tmp_path / "b", base, [chat_file(tmp_path, 16, seed=2)], *lora, "lora.targets=[wq,wv]")).fit()
    sys.path.insert(0, f"{REPO}/launch")  # for the script's `import _bootstrap`, only while importing it
    try:
        from launch.merge_lora import main
    finally:
        sys.path.remove(f"{REPO}/launch")

    assert main(["--blend", f"{tmp_path / 'a'}=0.5", f"{tmp_path / 'b'}=0.5", str(tmp_path / "merged")]) == 0
    merged = str(tmp_path / "merged")
    plain = Transformer(ckpt.read_model_config(merged)).eval()
    load_weights(plain, read_init_weights(merged, plain.cfg, "off"), merged)
    x = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    step_a, step_b = ckpt.resolve(str(tmp_path / "a")), ckpt.resolve(str(tmp_path / "b"))
    model = load_base(step_a).eval()
    add_adapter_from(model, step_a, "a")
    add_adapter_from(model, step_b, "b")
    with torch.no_grad():
        set_blend(model, {"a": 0.5, "b": 0.5})
        torch.testing.assert_close(plain(x)[0], model(x)[0], atol=1e-5, rtol=1e-5)
        set_active_adapter(model, "a")
        assert (plain(x)[0] - model(x)[0]).abs().max() > 1e-5  # b's half is in the merged weights
    with pytest.raises(SystemExit) as e:  # a weight must be a number
        main(["--blend", f"{tmp_path / 'a'}=half", str(tmp_path / "m2")])
    assert e.value.code == 2

    # One checkpoint under two spellings (its run directory and its step directory, a symbolic
    # link to the run) would be one dict entry with one of the two weights: refused, naming both.
    from train.sft.adapters import merge_blend

    os.symlink(tmp_path / "a", tmp_path / "a_link")
    with pytest.raises(ValueError, match="twice") as e:
        merge_blend({str(tmp_path / "a"): 0.5, step_a: 0.5}, str(tmp_path / "m3"))
    assert repr(str(tmp_path / "a")) in str(e.value) and repr(step_a) in str(e.value)
    spellings = [f"{tmp_path / 'a'}=0.5", f"{tmp_path / 'b'}=0.25", f"{tmp_path / 'a_link'}=0.5"]
    assert main(["--blend", *spellings, str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert "twice" in err and repr(str(tmp_path / "a")) in err and repr(str(tmp_path / "a_link")) in err
    assert main(["--blend", f"{tmp_path / 'a'}=0.5", f"{tmp_path / 'a'}=0.5", str(tmp_path / "m3")]) == 2  # same text
    assert not os.path.exists(tmp_path / "m3")


def test_an_adapter_added_to_a_model_in_eval_mode_applies_no_dropout():
    """A new dropout module starts in training mode; added to a model already in eval mode it
    must follow the model, or inference through the adapter is random."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64,
                                    max_seq_len=16)).eval()
    add_lora(model, "a", 4, 8.0, dropout=0.5)
    for name, p in model.named_parameters():  # a nonzero B, so the adapter's branch (and its dropout) shows
        if "lora_B_a" in name:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        first, second = model(x)[0], model(x)[0]
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x)[0], model(x)[0])  # in training mode the dropout does act
