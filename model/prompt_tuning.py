"""Prompt tuning (Lester et al. 2021): N trained virtual-token embeddings before every input.

The base model stays frozen; only an (N, d_model) table trains, a few thousand parameters.
kiln gives the virtual tokens ids of their own, ``vocab_size .. vocab_size + N - 1``:
``tok_embeddings`` becomes a ``PromptEmbedding`` that looks those ids up in the trained
table and every other id in the base embedding (the same Parameter, so the tied output
projection stays tied and ``tok_embeddings.weight`` keeps its name; the table is
``tok_embeddings.prompt``). Prepending N ids is then all it takes: positions, attention
masks, left padding and the KV cache of ``model.llama.generate`` work unchanged, and the
output head never predicts a virtual id (it has ``vocab_size`` rows).

``prepend`` does it for a training or evaluation batch (targets of the virtual positions
are ignored, a classifier's ``last_index`` moves by N, given positions shift by N),
``with_virtual_ids`` for generation prompts. Initialisation copies embedding rows: of a
text's token ids (cycled to N), or of N ids drawn from the vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PROMPT = "tok_embeddings.prompt"  # the trained table's parameter name


class PromptEmbedding(nn.Module):
    """The base embedding plus N virtual-token rows (ids from ``num_base`` on)."""

    def __init__(self, base: nn.Embedding, n_tokens: int):
        super().__init__()
        self.weight = base.weight  # the same Parameter: no copy, tying and its name unchanged
        self.num_base = base.num_embeddings
        self.prompt = nn.Parameter(torch.zeros(n_tokens, base.embedding_dim, device=base.weight.device,
                                               dtype=torch.float32))

    @property
    def n_tokens(self) -> int:
        return self.prompt.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        virtual = ids >= self.num_base
        h = F.embedding(torch.where(virtual, 0, ids), self.weight)
        rows = self.prompt[(ids - self.num_base).clamp(0, self.n_tokens - 1)].to(h.dtype)
        return torch.where(virtual.unsqueeze(-1), rows, h)  # no host sync: both looked up, one kept


def add_prompt_tuning(model: nn.Module, n_tokens: int, init_ids: Optional[list[int]] = None,
                      seed: int = 0) -> str:
    """Give ``model`` (a Transformer or TransformerClassifier) ``n_tokens`` virtual tokens,
    initialised from the embedding rows of ``init_ids`` (a text's ids, cycled to N) or, if
    None, of N ids drawn uniformly from the vocabulary with ``seed``. Returns the parameter name."""
    if n_tokens < 1:
        raise ValueError(f"prompt tuning needs at least one virtual token, got {n_tokens}")
    base = model.tok_embeddings
    if isinstance(base, PromptEmbedding):
        raise ValueError("the model already has prompt tuning")
    emb = PromptEmbedding(base, n_tokens)
    if init_ids:
        ids = torch.tensor([init_ids[i % len(init_ids)] for i in range(n_tokens)])
    else:
        ids = torch.randint(0, emb.num_base, (n_tokens,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        emb.prompt.copy_(base.weight.detach()[ids.to(base.weight.device)].float())
    model.tok_embeddings = emb
    return PROMPT


def prompt_embedding(model: nn.Module) -> Optional[PromptEmbedding]:
    emb = getattr(model, "tok_embeddings", None)
    return emb if isinstance(emb, PromptEmbedding) else None


def virtual_ids(model: nn.Module) -> list[int]:
    emb = prompt_embedding(model)
    if emb is None:
        raise ValueError("the model has no prompt tuning (add_prompt_tuning)")
    return list(range(emb.num_base, emb.num_base + emb.n_tokens))


def train_only_prompt(model: nn.Module, extra_prefixes=()) -> list[str]:
    """Freeze everything but the virtual-token table (and parameters under ``extra_prefixes``,
    e.g. a classification head). Returns the trainable names."""
    extra = tuple(extra_prefixes)
    trainable = []
    for n, p in model.named_parameters():
        p.requires_grad = n == PROMPT or (bool(extra) and n.startswith(extra))
        if p.requires_grad:
            trainable.append(n)
    return trainable


def with_virtual_ids(model: nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    """Generation prompts with the virtual ids in front (for ``model.llama.generate``)."""
    v = virtual_ids(model)
    return [v + list(p) for p in prompts]


def prepend(model: nn.Module, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
            classification: bool = False, **kw) -> tuple[torch.Tensor, Optional[torch.Tensor], dict]:
    """A batch (B, T) as the prompt-tuned model reads it: (B, N + T) with the virtual ids
    first. LM targets get N ignored (-100) positions; a classifier's class targets are
    unchanged and its ``last_index`` moves by N; ``position_ids`` (per-row positions) are
    shifted by N after the virtual tokens' 0..N-1; ``doc_ids`` give the virtual tokens the
    row's first document; ``key_mask`` marks them real."""
    v = torch.tensor(virtual_ids(model), device=tokens.device, dtype=tokens.dtype)
    B, n = tokens.shape[0], len(v)
    out_tokens = torch.cat([v.expand(B, n), tokens], dim=1)
    if targets is not None and not classification:
        targets = torch.cat([targets.new_full((B, n), -100), targets], dim=1)
    kw = dict(kw)
    if kw.get("position_ids") is not None:
        pos = kw["position_ids"].expand(B, -1)
        first = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(B, n)
        kw["position_ids"] = torch.cat([first, pos + n], dim=1)
    if kw.get("doc_ids") is not None:
        d = kw["doc_ids"]
        kw["doc_ids"] = torch.cat([d[:, :1].expand(B, n), d], dim=1)
    if kw.get("key_mask") is not None:
        m = kw["key_mask"]
        kw["key_mask"] = torch.cat([m.new_ones(B, n), m], dim=1)
    if kw.get("last_index") is not None:
        kw["last_index"] = kw["last_index"] + n
    return out_tokens, targets, kw
