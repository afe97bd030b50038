"""A Llama-style decoder-only transformer, readable in one sitting.

RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention, no biases,
optionally tied input/output embeddings. Attention goes through
``torch.nn.functional.scaled_dot_product_attention`` so the GPU picks flash or
memory-efficient kernels. This file knows nothing about data, parallelism or
checkpoint formats: sharding, compilation and activation checkpointing are applied
from outside (see ``train/``).

Initialisation: every Linear and the embedding draw from N(0, init_std); the two
projections that write into the residual stream (attention ``wo`` and MLP ``w2``) are
scaled down by 1/sqrt(2 * n_layers) so the residual variance stays O(1) with depth
(GPT-2 / Megatron scheme). RMSNorm gains start at 1. Each block of rows of a parameter is
drawn from its own generator, seeded by (model seed, parameter name, block), so any slice
of the initial weights can be made alone and equals the same slice of the whole: a sharded
trainer initialises only its shard and still gets the weights of a one-process run
(``init_rows``; the sharding itself lives in ``train/sharded_init.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@dataclass
class ModelConfig:
    """Shape of the network. ``vocab_size=None`` means: take it from the tokenizer."""

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head); fewer = grouped-query
    ffn_hidden: Optional[int] = None  # None = Llama rule: 2/3 * 4 * d_model, rounded to multiple_of
    multiple_of: int = 64
    vocab_size: Optional[int] = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dropout: float = 0.0
    # Positions per chunk of output layer + loss: beyond this many tokens in a micro-batch the
    # [tokens, vocab] logits (and their fp32 copy) are computed chunk by chunk and recomputed in
    # backward, never held whole (8192 tokens x 128k vocab in fp32 would be 4 GB).
    loss_chunk: int = 4096
    # Packed documents (doc_ids): "auto" = flex_attention's block-sparse mask on a GPU (only
    # blocks that hold tokens of one document are computed), a dense mask for SDPA on a CPU;
    # "flex" / "sdpa" force one ("flex" on a CPU only without gradients: torch has no CPU
    # flex backward). Plain causal attention is always SDPA (flash on a GPU).
    attention: str = "auto"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.d_model / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def shape(self) -> dict:
        """What fixes the parameters' names and shapes: two configs with the same shape can
        load each other's weights (max_seq_len, rope_theta, dropout may differ)."""
        return {"d_model": self.d_model, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.kv_heads, "ffn_hidden": self.hidden_dim, "vocab_size": self.vocab_size,
                "tie_embeddings": self.tie_embeddings}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim // 2), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :d/2], x[..., d/2:]) -- the Hugging Face Llama convention,
    so exported weights need no permutation. x: (B, H, T, D); cos/sin: (B or 1, T, D/2)."""
    d2 = x.shape[-1] // 2
    x1, x2 = x[..., :d2].float(), x[..., d2:].float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], kv_cache: Optional[KVCache] = None):
        B, T, _ = x.shape
        # Heads counted from the projections' width (-1), not the config: under tensor
        # parallelism (train/parallel/) each rank's projections hold only its own heads.
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        drop = self.dropout if self.training else 0.0
        gqa = self.n_kv != self.n_heads  # SDPA shares each K/V head across its query group: no copies
        if isinstance(mask, BlockMask):
            y = _flex(q, k, v, mask, gqa)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, mask=None, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Keys/values of one layer for incremental decoding, preallocated to max length on
    the first update, in the device and dtype of the keys it gets: those of the compute
    (a GPU and bf16 under mixed precision), whatever device and dtype the weights are
    stored in (on the CPU, in fp32, when parameters are offloaded)."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int):
        self.shape = (batch, n_kv, max_len, head_dim)
        self.k = self.v = None
        self.pos = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:  # heads from the keys: a tensor-parallel rank caches its own heads only
            self.k = torch.zeros((self.shape[0], k.shape[1], *self.shape[2:]), device=k.device, dtype=k.dtype)
            self.v = torch.zeros_like(self.k)
        t = k.shape[2]
        self.k[:, :, self.pos : self.pos + t] = k
        self.v[:, :, self.pos : self.pos + t] = v
        self.pos += t
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_weights: bool = True):
        """``init_weights=False`` leaves the parameters as allocated (on the meta device, or
        partitioned): whoever owns their storage fills them with ``init_rows``."""
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building the model")
        # One draw from the global RNG, first (building layers on a real device draws too, on
        # the meta device not), so torch.manual_seed(s) fixes the initial weights however
        # they are materialised.
        self.init_seed = int(torch.randint(0, 2**62, (), device="cpu"))  # see reset_parameters
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # The loss as an attribute, so train/compile.py can swap in a compiled one (fusing
        # log-softmax, its backward and the tied-embedding gradient) without a new module.
        self.loss_fn = chunked_cross_entropy
        # Not persistent: derived from the config, so checkpoints hold weights only.
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        if not self.rope_cos.is_meta:
            self.reset_buffers()
        if init_weights:
            self.reset_parameters()

    def reset_buffers(self):
        """(Re)compute the rotary tables in fp32, replacing the buffers: after ``to_empty`` from
        the meta device, or after a context that made them in another dtype (DeepSpeed's
        zero.Init casts new float tensors to bf16, where positions past 256 collide)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        device = self.rope_cos.device if not self.rope_cos.is_meta else torch.device("cpu")
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def init_std(self, name: str) -> Optional[float]:
        """The normal std parameter ``name`` starts from; None: it starts at ones (norm gains)."""
        if name.endswith("norm.weight"):
            return None
        if name.endswith(("wo.weight", "w2.weight")):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    def reset_parameters(self):
        with torch.no_grad():
            for name, p in self.named_parameters():
                init_rows(self.init_seed, name, tuple(p.shape), self.init_std(name), 0, p.shape[0], out=p.data)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        kv_caches: Optional[list[KVCache]] = None,
        return_hidden: bool = False,
        key_mask: torch.Tensor | None = None,
    ):
        """tokens: (B, T). targets: (B, T) with -100 where no loss is wanted.

        ``doc_ids`` (B, T) makes attention block-causal: a token only sees earlier tokens
        of its own document, so packed sequences never attend across documents.
        ``position_ids`` restarts rotary positions per document (the caller keeps them below
        ``max_seq_len``: checking would cost a device sync every step). Returns (logits, None)
        without targets; with targets (None, loss), the mean over non-ignored targets, computed
        by ``chunked_cross_entropy`` so full-vocabulary logits are never materialised.
        ``key_mask`` (B, cached + T), True for real tokens, hides padding from attention
        (left-padded batches in ``generate``); pass per-row ``position_ids`` with it.
        """
        B, T = tokens.shape
        start = kv_caches[0].pos if kv_caches else 0
        if position_ids is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"position {start + T - 1} >= model.max_seq_len={self.cfg.max_seq_len}")
            position_ids = torch.arange(start, start + T, device=tokens.device).unsqueeze(0)
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]
        mask = None
        if doc_ids is not None and uses_flex(self.cfg, tokens.device, self.training, torch.is_grad_enabled()):
            mask = document_block_mask(doc_ids)
        elif doc_ids is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
            mask = (doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)) & causal
            mask = mask.unsqueeze(1)  # (B, 1, T, T), broadcast over heads
        elif key_mask is not None:
            q_pos = torch.arange(start, start + T, device=tokens.device)[:, None]
            k_pos = torch.arange(start + T, device=tokens.device)[None, :]
            # Every query also sees itself, so a padding query never has an all-masked row
            # (which would give NaNs that leak into the cache); real queries never see pads.
            mask = ((k_pos <= q_pos) & key_mask[:, None, :].bool()) | (k_pos == q_pos)
            mask = mask.unsqueeze(1)  # (B, 1, T, cached + T)
        elif kv_caches is not None and start > 0:
            # Decoding with a cache: new queries see every cached key plus the causal part.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=tokens.device).tril(diagonal=start)
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, kv_caches[i] if kv_caches else None)
        h = self.norm(h)
        if return_hidden:
            return h
        if targets is None:
            return self.output(h), None
        return None, self.loss_fn(self.output, h, targets, self.cfg.loss_chunk)

    def new_kv_caches(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.cfg
        return [KVCache(batch, c.kv_heads, max_len, c.head_dim) for _ in range(c.n_layers)]


def uses_flex(cfg: ModelConfig, device: torch.device, training: bool = True, grad: bool = True) -> bool:
    """Whether packed documents (``doc_ids``) are masked with flex_attention's block-sparse
    mask (else a dense mask for SDPA): ``model.attention``, the device, and whether this is
    training (flex has no dropout, and no CPU backward)."""
    choice = cfg.attention
    if choice == "auto":
        return device.type == "cuda" and not (training and cfg.dropout > 0)
    return choice == "flex" and (device.type == "cuda" or not grad)


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """flex_attention's block-sparse form of "causal, and within one document" for (B, T)
    document ids: blocks of 128 x 128 positions that cross documents are skipped, where a
    dense (B, 1, T, T) mask would cost T*T bytes per row and keep SDPA off flash kernels."""
    B, T = doc_ids.shape

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    # Compiled on a GPU: uncompiled, create_block_mask materialises the whole (B, T, T) mask first.
    return create_block_mask(same_document_causal, B, None, T, T, device=doc_ids.device,
                             _compile=doc_ids.device.type == "cuda")


_compiled_flex = None


def _flex(q, k, v, block_mask: BlockMask, gqa: bool) -> torch.Tensor:
    """flex_attention, compiled on a GPU (eager flex is an unfused reference implementation,
    which is what the CPU runs when ``attention=flex`` is forced there)."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)  # dynamic shapes: SFT batches vary in length
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _ce_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, ignore_index=-100, reduction="sum")


def chunked_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of ``head(h)`` over targets that are not -100 (0 when there are none).

    Up to ``chunk`` positions this is the plain loss. Beyond, each chunk's logits are made,
    reduced to a loss sum and dropped; the backward pass recomputes them chunk by chunk
    (activation checkpointing of the output layer), so memory holds one chunk's logits at a
    time for the price of one more output-layer matmul. ``head`` is called as a module, so
    sharded parameters (FSDP, ZeRO-3) are gathered by the backend's hooks as for any layer.
    """
    h, targets = h.reshape(-1, h.size(-1)), targets.reshape(-1)
    count = (targets != -100).sum().clamp(min=1)
    if h.size(0) <= chunk:
        return _ce_sum(head, h, targets) / count
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(_ce_sum, head, h[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
                for i in range(0, h.size(0), chunk))
    return total / count


INIT_BLOCK = 1 << 16  # elements per independently seeded draw


def init_rows(seed: int, name: str, shape: tuple, std: Optional[float], start: int, stop: int,
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows ``start:stop`` of parameter ``name``'s initial value (full shape ``shape``), fp32 on
    the CPU: N(0, std), or ones when ``std`` is None. Rows come in blocks of about INIT_BLOCK
    elements, each from a generator seeded by (seed, name, block), so the result does not
    depend on which rows are asked for together. ``out`` (a tensor of those rows): filled and
    returned; a contiguous CPU fp32 one is drawn into in place, with no second copy of the
    rows in memory, any other receives a copy of the CPU draw."""
    if out is not None and not (out.device.type == "cpu" and out.dtype == torch.float32 and out.is_contiguous()):
        return out.copy_(init_rows(seed, name, shape, std, start, stop))
    cols = math.prod(shape[1:])
    if out is None:
        out = torch.empty((stop - start,) + tuple(shape[1:]))
    if std is None:
        return out.fill_(1.0)
    rows = max(1, INIT_BLOCK // max(cols, 1))
    for block in range(start // rows, (stop + rows - 1) // rows):
        digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        b0, b1 = block * rows, min((block + 1) * rows, shape[0])  # the block's rows
        lo, hi = max(b0, start), min(b1, stop)  # those asked for
        if (lo, hi) == (b0, b1):
            out[lo - start:hi - start].normal_(0.0, std, generator=g)
        else:  # a block cut by start or stop: draw it whole, keep the part asked for
            drawn = torch.empty((b1 - b0,) + tuple(shape[1:])).normal_(0.0, std, generator=g)
            out[lo - start:hi - start].copy_(drawn[lo - b0:hi - b0])
    return out


def param_count(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Closed-form parameter count; tests check it against the real module."""
    d, hd, v = cfg.d_model, cfg.head_dim, cfg.vocab_size
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2  # wq, wo, wk, wv
    mlp = 3 * d * cfg.hidden_dim
    per_layer = attn + mlp + 2 * d  # two RMSNorm gains
    n = cfg.n_layers * per_layer + d  # final norm
    n += v * d if cfg.tie_embeddings else 2 * v * d  # embedding (+ untied output)
    if not include_embeddings:
        n -= v * d
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6 * N + 12 * L * d * T.

    N counts the matmul parameters (every weight except the input embedding, which is a
    lookup); 12*L*d*T is the attention score/value matmuls (PaLM paper, appendix B).
    This is the denominator-free number used for MFU.
    """
    n = param_count(cfg, include_embeddings=False)
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model  # the output projection is still a matmul
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.d_model * seq_len


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: torch.Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
    return_logprobs: bool = False,
):
    """Sample continuations of ``prompt``. temperature 0 = greedy.

    ``prompt`` is a (B, T) tensor, or a list of token-id lists of different lengths: those
    are left-padded, padding is masked out of attention and every row gets its own rotary
    positions, so each row's output equals generating it alone (up to float rounding).
    ``eos_id`` is one stop id or several (EOS and the end-of-turn token, say). Rows that
    emit one stop growing (they are padded with the first stop id). Returns only the new
    tokens, (B, <= max_new_tokens).

    ``device``: where the forward computes (default: where the weights are; a trainer
    with offloaded parameters passes its accelerator). Compiled blocks run eagerly here:
    every decoding step has new shapes (prompt length, then one token against a growing
    cache), which would recompile them for a few tokens of output.

    ``return_logprobs``: also return, per new token, its log-probability under
    softmax(logits / temperature) (the raw logits when greedy), before top-k / top-p
    truncation: the distribution a training forward at that temperature computes (RLHF
    rollouts record it at sampling time). Returns ``(tokens, logprobs)``, both (B, new).
    """
    with torch.compiler.set_stance("force_eager"):
        return _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator,
                         device or model.tok_embeddings.weight.device, return_logprobs)


def _generate(model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, device,
              return_logprobs=False):
    was_training = model.training
    model.eval()
    key_mask = pos = None
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.to(device)
    else:
        lengths = [len(p) for p in prompt]
        if min(lengths) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        T = max(lengths)
        rows = [[0] * (T - len(p)) + [int(t) for t in p] for p in prompt]
        prompt = torch.tensor(rows, dtype=torch.long, device=device)
        if min(lengths) < T:
            key_mask = torch.tensor([[False] * (T - n) + [True] * n for n in lengths], device=device)
            pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    stop = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=device)
    B, T = prompt.shape
    total = min(T + max_new_tokens, model.cfg.max_seq_len)
    caches = model.new_kv_caches(B, total) if use_cache else None
    seq = prompt
    out, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    inp, inp_pos = prompt, pos
    for _ in range(total - T):
        if use_cache:
            logits, _ = model(inp, position_ids=inp_pos, kv_caches=caches, key_mask=key_mask)
        else:
            logits, _ = model(seq, position_ids=pos, key_mask=key_mask)
        last = logits[:, -1, :].float()
        nxt = _sample(last, temperature, top_k, top_p, generator)
        if return_logprobs:
            scaled = last / temperature if temperature > 0 else last
            logps.append(torch.log_softmax(scaled, -1).gather(-1, nxt[:, None]).squeeze(-1))
        if len(stop):
            nxt = torch.where(done, stop[0], nxt)
            done |= torch.isin(nxt, stop)
        out.append(nxt)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        inp = nxt[:, None]
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
            inp_pos = pos[:, -1:] + 1
            pos = torch.cat([pos, inp_pos], dim=1)
        if len(stop) and bool(done.all()):
            break
    model.train(was_training)
    tokens = torch.stack(out, dim=1) if out else prompt.new_zeros(B, 0)
    if return_logprobs:
        return tokens, torch.stack(logps, dim=1) if logps else torch.zeros(B, 0, device=device)
    return tokens


def _sample(logits, temperature, top_k, top_p, generator):
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
