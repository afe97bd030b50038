"""Preference optimisation core (train/sft/preference.py): the losses against hand-computed
values, the sign convention and beta -> 0, log-probs that only count reply tokens, pairs that
share their prompt ids and are cut alike, and LoRA-with-adapters-off as the reference."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from model.llama import ModelConfig, Transformer
from train.sft.preference import (
    collate_pairs,
    encode_pair,
    preference_loss,
    reference_logprobs,
    sequence_logprobs,
)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_losses_and_rewards_equal_hand_computed_values():
    pc, pr = torch.tensor([-10.0, -12.0]), torch.tensor([-14.0, -11.0])
    rc, rr = torch.tensor([-11.0, -12.5]), torch.tensor([-13.0, -10.0])
    beta = 0.1
    h = [(-10 + 11) - (-14 + 13), (-12 + 12.5) - (-11 + 10)]  # [2.0, 1.5]
    loss, m = preference_loss(pc, pr, rc, rr, beta)
    assert float(loss) == pytest.approx(sum(-math.log(sig(beta * x)) for x in h) / 2, rel=1e-6)
    assert m["reward_accuracy"] == 1.0
    assert m["reward_margin"] == pytest.approx(beta * sum(h) / 2, rel=1e-6)
    ipo, _ = preference_loss(pc, pr, rc, rr, beta, kind="ipo")
    assert float(ipo) == pytest.approx(sum((x - 1 / (2 * beta)) ** 2 for x in h) / 2, rel=1e-6)
    eps = 0.2
    cdpo, _ = preference_loss(pc, pr, rc, rr, beta, kind="cdpo", label_smoothing=eps)
    want = sum(-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h) / 2
    assert float(cdpo) == pytest.approx(want, rel=1e-6)


def test_sign_convention_and_beta_to_zero():
    ref = torch.zeros(1)
    favours_chosen, _ = preference_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), ref, ref, beta=0.5)
    favours_rejected, m = preference_loss(torch.tensor([-3.0]), torch.tensor([-1.0]), ref, ref, beta=0.5)
    assert float(favours_chosen) < math.log(2) < float(favours_rejected)
    assert m["reward_accuracy"] == 0.0 and m["reward_margin"] < 0
    tiny, _ = preference_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), ref, ref, beta=1e-8)
    assert float(tiny) == pytest.approx(math.log(2), abs=1e-6)  # beta -> 0: no preference learned yet
    with pytest.raises(ValueError, match="beta"):
        preference_loss(ref, ref, ref, ref, beta=0.0)


def test_padding_and_prompt_never_enter_a_sequence_log_prob():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    targets = torch.tensor([[-100, -100, 3, 4, -100, -100], [-100, 5, 6, 7, 8, -100]])
    got = sequence_logprobs(logits, targets)
    changed = logits.clone()
    changed[0, [0, 1, 4, 5]] = torch.randn(4, 11) * 50  # prompt and padding positions: anything
    changed[1, [0, 5]] = torch.randn(2, 11) * 50
    assert torch.allclose(sequence_logprobs(changed, targets), got)
    logp = torch.log_softmax(logits, -1)
    assert float(got[0]) == pytest.approx(float(logp[0, 2, 3] + logp[0, 3, 4]), rel=1e-6)


def test_pairs_share_the_prompt_ids_and_are_cut_alike(tokenizer):
    counts = Counter()
    pair = encode_pair(tokenizer, "How do I open a file?", "Use open(path).", "No idea, sorry.", 64, counts)
    batch = collate_pairs([pair], pad_id=0)
    chosen, rejected = batch["input"][0], batch["input"][1]
    n = len(pair.prompt)
    assert torch.equal(chosen[:n], rejected[:n])
    assert (batch["target"][:, : n - 1] == -100).all()  # no prompt token is a target
    replies = [pair.chosen, pair.rejected]
    for row, reply in enumerate(replies):
        t = batch["target"][row]
        assert t[t != -100].tolist() == reply  # targets: the reply, end-of-turn included, nothing else
    long = " ".join(["word"] * 200)
    cut = encode_pair(tokenizer, "Say many words.", long, "Others: " + long, 40, counts)
    assert counts["truncated_pairs"] == 1 and len(cut.prompt) + len(cut.chosen) - 1 <= 40
    assert len(cut.chosen) == len(cut.rejected)
    # Replies that differ only past the cut would be the same pair: dropped, and counted.
    assert encode_pair(tokenizer, "Say many words.", long, long + " more", 40, counts) is None
    assert counts["dropped_same_after_truncation"] == 1
    assert encode_pair(tokenizer, long, "a", "b", 40, counts) is None and counts["dropped_prompt_too_long"] == 1


def test_lora_with_adapters_off_is_the_frozen_base_as_reference():
    from model.lora import add_lora, lora_modules

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=50, max_seq_len=32)
    base = Transformer(cfg)
    policy = Transformer(cfg)
    policy.load_state_dict(base.state_dict())
    add_lora(policy, "dpo", rank=4, alpha=8, targets=["wq", "wv"])
    for m in lora_modules(policy):  # a trained adapter: non-zero B
        torch.nn.init.normal_(m.B("dpo"), std=0.5)
    batch = {"input": torch.randint(0, 50, (3, 12)), "target": torch.randint(0, 50, (3, 12))}
    batch["target"][:, :4] = -100
    explicit = reference_logprobs(base, batch, reference=base)
    via_lora = reference_logprobs(policy, batch, adapter="dpo")
    assert torch.allclose(via_lora, explicit, atol=1e-5)
    with torch.no_grad():
        with_adapter = sequence_logprobs(policy(batch["input"])[0], batch["target"])
    assert not torch.allclose(with_adapter, explicit, atol=1e-3)  # the adapter is back on, and it matters
