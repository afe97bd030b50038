import glob
import os

import pytest
import torch
import yaml

from model.llama import ModelConfig, Transformer, flops_per_token, generate, param_count, uses_flex
from tests.conftest import CONF


def small(**kw):
    base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


def test_changing_a_future_token_never_changes_earlier_logits():
    torch.manual_seed(0)
    m = Transformer(small()).eval()
    x = torch.randint(0, 101, (2, 32))
    for t in (0, 7, 31):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 101
        a, _ = m(x)
        b, _ = m(y)
        assert torch.equal(a[:, :t], b[:, :t])
        assert not torch.allclose(a[:, t:], b[:, t:])  # the change is visible from t on


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONF, "model", "*.yaml"))))
def test_param_count_formula_matches_real_module_for_every_shipped_config(path):
    values = yaml.safe_load(open(path))
    cfg = ModelConfig(**values)
    if cfg.vocab_size is None:
        cfg.vocab_size = 32000
    with torch.device("meta"):
        m = Transformer(cfg)
    real = sum(p.numel() for p in m.parameters())  # tied weights are counted once
    assert param_count(cfg) == real
    assert flops_per_token(cfg, 128) > 6 * param_count(cfg, include_embeddings=False)


def test_llama2_7b_config_has_the_published_parameter_count():
    cfg = ModelConfig(**yaml.safe_load(open(os.path.join(CONF, "model", "7b.yaml"))))
    assert param_count(cfg) == 6_738_415_616  # Llama-2-7b-hf, counted from its safetensors index


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = Transformer(small(n_kv_heads=2)).eval()
    mha = Transformer(small(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    hd = 16
    for i in range(2):
        for name in ("wk", "wv"):
            w = sd[f"layers.{i}.attn.{name}.weight"].view(2, hd, 64)
            sd[f"layers.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, 101, (1, 16))
    assert torch.allclose(gqa(x)[0], mha(x)[0], atol=1e-5)


def test_document_mask_makes_packed_documents_independent():
    torch.manual_seed(0)
    m = Transformer(small()).eval()
    a, b = torch.randint(0, 101, (1, 10)), torch.randint(0, 101, (1, 6))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 10 + [1] * 6])
    pos = torch.tensor([list(range(10)) + list(range(6))])
    out, _ = m(packed, doc_ids=doc_ids, position_ids=pos)
    ra, _ = m(a)
    rb, _ = m(b)
    assert torch.allclose(out[:, :10], ra, atol=1e-5)
    assert torch.allclose(out[:, 10:], rb, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention called without torch.compile")
def test_flex_attention_block_mask_equals_the_dense_document_mask():
    """attention=flex (the GPU path for packed documents) against the dense SDPA mask, on the
    CPU where flex runs eagerly and forward only (benchmarks/gpu_checks.py compares gradients
    on CUDA): 3 documents per row, one crossing a 128-position block edge."""
    torch.manual_seed(0)
    cfg = small(max_seq_len=256)
    dense, flex = Transformer(cfg), Transformer(ModelConfig(**{**cfg.__dict__, "attention": "flex"}))
    flex.load_state_dict(dense.state_dict())
    x = torch.randint(0, 101, (2, 200))
    doc_ids = torch.tensor([[0] * 70 + [1] * 90 + [2] * 40, [0] * 150 + [1] * 10 + [2] * 40])
    pos = torch.cat([torch.arange(n) for n in (70, 90, 40)]).repeat(2, 1)
    pos[1] = torch.cat([torch.arange(n) for n in (150, 10, 40)])
    with torch.no_grad():
        (o1, _), (o2, _) = (m(x, position_ids=pos, doc_ids=doc_ids) for m in (dense, flex))
        (_, l1), (_, l2) = (m(x, x, position_ids=pos, doc_ids=doc_ids) for m in (dense, flex))
        plain, _ = dense(x, position_ids=pos)
    assert torch.allclose(o1, o2, atol=1e-5)
    assert abs(float(l1) - float(l2)) < 1e-5
    # A mask that ignored documents would not match: the second document sees the first otherwise.
    assert not torch.allclose(plain, o2, atol=1e-3)
    # Training on the CPU, where torch has no flex backward, keeps the dense mask.
    cpu = torch.device("cpu")
    assert uses_flex(flex.cfg, cpu, flex.training, torch.is_grad_enabled()) is False
    with torch.no_grad():
        assert uses_flex(flex.cfg, cpu, flex.training, torch.is_grad_enabled()) is True


def test_loss_ignores_minus_100_targets():
    torch.manual_seed(0)
    m = Transformer(small())
    x = torch.randint(0, 101, (1, 8))
    y = x.clone()
    y[:, :4] = -100
    logits, _ = m(x)
    _, loss = m(x, y)
    ref = torch.nn.functional.cross_entropy(logits[0, 4:], x[0, 4:])
    assert torch.allclose(loss, ref)


def test_init_scales_residual_projections_by_depth():
    torch.manual_seed(0)
    m = Transformer(small(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4))
    assert abs(m.layers[0].attn.wq.weight.std().item() - 0.02) < 0.002
    assert abs(m.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 0.001
    assert torch.all(m.norm.weight == 1)


def test_tied_embeddings_share_one_tensor():
    m = Transformer(small(tie_embeddings=True))
    assert m.output.weight.data_ptr() == m.tok_embeddings.weight.data_ptr()


def test_kv_cache_generation_equals_full_recompute():
    torch.manual_seed(0)
    m = Transformer(small())
    prompt = torch.randint(0, 101, (2, 5))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with_cache = generate(m, prompt, 20, temperature=0.9, top_k=20, top_p=0.9, generator=g1)
    without = generate(m, prompt, 20, temperature=0.9, top_k=20, top_p=0.9, use_cache=False, generator=g2)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (2, 20)


def test_positions_past_max_seq_len_are_rejected():
    m = Transformer(small(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_chunked_loss_equals_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    cfg = small()
    m = Transformer(cfg)
    x = torch.randint(0, 101, (3, 16))
    y = torch.randint(0, 101, (3, 16))
    y[0, :5] = -100
    y[2, 9:] = -100
    logits, _ = m(x)
    plain = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100)
    plain.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.cfg.loss_chunk = 7  # 48 positions in 7 chunks, the last one short
    _, chunked = m(x, y)
    chunked.backward()
    assert abs(float(chunked) - float(plain)) <= 1e-6
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)


def test_loss_of_a_batch_without_targets_is_zero_not_nan():
    m = Transformer(small())
    x = torch.randint(0, 101, (2, 8))
    _, loss = m(x, torch.full_like(x, -100))
    assert float(loss) == 0.0


def test_rotary_tables_are_rebuilt_in_fp32_whatever_dtype_they_were_made_in():
    """DeepSpeed's zero.Init makes new float tensors in bf16; bf16 positions collide past 256."""
    from model.llama import rope_tables

    m = Transformer(small(max_seq_len=4096))
    m.rope_cos, m.rope_sin = m.rope_cos.bfloat16(), m.rope_sin.bfloat16()
    m.reset_buffers()
    cos, sin = rope_tables(m.cfg.head_dim, 4096, m.cfg.rope_theta)
    assert m.rope_cos.dtype == torch.float32 and torch.equal(m.rope_cos, cos) and torch.equal(m.rope_sin, sin)
    assert "rope_cos" in dict(m.named_buffers())  # still a (non-persistent) buffer
