"""Prompt tuning: N virtual-token embeddings before every input, the base frozen.

A table initialised from a text's embeddings must make the model compute exactly what the
base computes with that text in front (LM logits, greedy generation, classifier logits),
training must change the table only, and checkpoints hold the table alone and resume exactly."""

from __future__ import annotations

import torch

from model.classifier import TransformerClassifier
from model.llama import ModelConfig, Transformer, generate
from model.prompt_tuning import PROMPT, add_prompt_tuning, prepend, train_only_prompt, virtual_ids, with_virtual_ids

CFG = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
TEXT = [11, 12, 13, 14, 15]  # a "text's" token ids
X = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def text_in_front(x):
    return torch.cat([torch.tensor(TEXT).expand(x.shape[0], -1), x], dim=1)


@torch.no_grad()
def test_a_table_initialised_from_a_text_computes_the_text_in_front():
    torch.manual_seed(0)
    base = Transformer(CFG).eval()
    want = base(text_in_front(X))[0][:, len(TEXT):]
    name = add_prompt_tuning(base, len(TEXT), init_ids=TEXT)
    assert name == PROMPT and virtual_ids(base) == [128, 129, 130, 131, 132]
    tokens, _, _ = prepend(base, X)
    assert torch.equal(base(tokens)[0][:, len(TEXT):], want)
    # greedy generation of prompts of different lengths (left padding) with the virtual ids in front
    prompts = [[5, 6, 7, 8], [9, 10]]
    plain = Transformer(CFG).eval()
    plain.load_state_dict({k: v for k, v in base.state_dict().items() if k != PROMPT})
    out = generate(base, with_virtual_ids(base, prompts), 6, temperature=0.0)
    assert torch.equal(out, generate(plain, [TEXT + p for p in prompts], 6, temperature=0.0))


@torch.no_grad()
def test_classifier_pools_the_last_real_token_after_the_virtual_ones():
    torch.manual_seed(0)
    cls = TransformerClassifier(CFG, 3).eval()
    last = torch.tensor([11, 6])  # the second row is right-padded after position 6
    want = cls(text_in_front(X), last_index=last + len(TEXT))[0]
    add_prompt_tuning(cls, len(TEXT), init_ids=TEXT)
    tokens, y, kw = prepend(cls, X, torch.tensor([0, 2]), classification=True, last_index=last)
    assert torch.equal(y, torch.tensor([0, 2]))
    torch.testing.assert_close(cls(tokens, **kw)[0], want, atol=1e-6, rtol=1e-6)


def test_training_changes_only_the_virtual_token_table():
    torch.manual_seed(0)
    model = Transformer(CFG)
    add_prompt_tuning(model, 4, seed=3)  # from the vocabulary
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = model.tok_embeddings.weight[torch.randint(0, 128, (4,), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(before[PROMPT], rows)  # initialised from vocabulary rows
    assert train_only_prompt(model) == [PROMPT]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        x, y, _ = prepend(model, X[:, :-1], X[:, 1:])
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n == PROMPT:
            assert (p - before[n]).abs().max() > 1e-3
        else:
            assert torch.equal(p, before[n]), n
