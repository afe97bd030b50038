"""The fine-tuning loss is the token mean over the whole global batch, and packing is exact.

- 1 micro-batch of 8 and 4 micro-batches of 2 (same 8 examples, different loss-token counts
  per micro-batch) give the same loss and the same gradients: the loop divides the summed
  token losses by the global token count, not by the number of micro-batches.
- A packed row (several examples, doc_ids + per-example positions) gives each example
  exactly the loss it has alone; naive packing (no document mask) does not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.llama import ModelConfig, Transformer
from tests.sft_helpers import chat_file, sft_cfg, tiny_checkpoint
from train.sft.batches import IGNORE, Example, collate_lm


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenizer_path):
    return tiny_checkpoint(tmp_path_factory, tokenizer_path)


def one_step(tmp_path, base, data, micro, accum, packing):
    from train.sft.trainer import SFTTrainer

    cfg = sft_cfg(tmp_path / f"run{micro}x{accum}", base, [data], f"train.micro_batch_size={micro}",
                  f"train.grad_accum_steps={accum}", f"sft.packing={str(packing).lower()}")
    tr = SFTTrainer(cfg)
    mbs = [next(tr.train_batches) for _ in range(accum)]
    loss, n_tokens, _ = tr.forward_backward(mbs)
    grads = {n: p.grad.clone() for n, p in tr.backend.raw_model.named_parameters() if p.grad is not None}
    per_micro = []
    with torch.no_grad():
        for mb in mbs:
            x, y, kw = tr.model_inputs(mb)
            per_micro.append(float(tr.backend.model(x, y, **kw)[1]))
    return loss, n_tokens, grads, mbs, per_micro


@pytest.mark.parametrize("packing", [False, True])
def test_one_micro_batch_of_8_equals_four_of_2(tmp_path, base, packing):
    data = chat_file(tmp_path, n=40)
    loss_a, tok_a, grads_a, mbs_a, _ = one_step(tmp_path, base, data, 8, 1, packing)
    loss_b, tok_b, grads_b, mbs_b, per_micro = one_step(tmp_path, base, data, 2, 4, packing)
    assert tok_a == tok_b == mbs_a[0]["loss_tokens"]
    assert torch.equal(torch.cat([mb["target"].flatten() for mb in mbs_b]).sort().values[-tok_b:],
                       mbs_a[0]["target"].flatten().sort().values[-tok_a:])  # the same 8 rows
    counts = [mb["loss_tokens"] for mb in mbs_b]
    assert len(set(counts)) > 1  # micro-batches really hold different numbers of loss tokens
    naive = sum(per_micro) / len(per_micro)  # what "loss / grad_accum_steps" would optimise
    assert abs(naive - loss_b) > 1e-3
    assert abs(loss_a - loss_b) < 1e-5
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-7, msg=n)


def per_example_losses(model, rows: list[list[Example]], packed: bool, doc_mask: bool = True) -> list[float]:
    batch = collate_lm(rows, 3, packed=packed)
    kw = batch.get("model_kwargs", {}) if doc_mask else {}
    with torch.no_grad():
        logits, _ = model(batch["input"], **kw)
    ce = F.cross_entropy(logits.flatten(0, 1), batch["target"].flatten(), ignore_index=IGNORE, reduction="none")
    ce = ce.view(batch["target"].shape)
    out = []
    for b, row in enumerate(rows):
        off = 0
        for e in row:
            n = len(e.input)
            mask = batch["target"][b, off:off + n] != IGNORE
            out.append(float(ce[b, off:off + n][mask].sum() / mask.sum()))
            off += n
    return out


def test_packed_rows_give_each_example_its_own_loss():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96,
                                    max_seq_len=64, init_std=0.2)).eval()
    g = torch.Generator().manual_seed(1)
    examples = []
    for n in (7, 12, 5, 9, 3):
        ids = torch.randint(4, 96, (n + 1,), generator=g).tolist()
        target = ids[1:]
        target[: n // 2] = [IGNORE] * (n // 2)  # a prompt part without loss
        examples.append(Example(ids[:-1], target))
    alone = [per_example_losses(model, [[e]], packed=False)[0] for e in examples]
    packed = per_example_losses(model, [examples[:3], examples[3:]], packed=True)
    assert packed == pytest.approx(alone, abs=1e-5)
    naive = per_example_losses(model, [examples[:3], examples[3:]], packed=True, doc_mask=False)
    assert max(abs(a - b) for a, b in zip(naive[1:3], alone[1:3])) > 1e-3  # the mask is what makes it exact


def test_continued_pretraining_reuses_the_pretraining_stream(tmp_path, base):
    from train.sft.trainer import SFTTrainer

    cfg = sft_cfg(tmp_path / "cpt", base, [], "task=continued_pretraining", "data.seq_len=32", "train.max_steps=2")
    tr = SFTTrainer(cfg)
    batch = next(tr.train_batches)
    assert batch["input"].shape == (4, 32) and tr.loss_tokens(batch) == 4 * 32  # every token is a target
    res = tr.fit()
    assert res["final_step"] == 2 and tr.tokenizer.path.endswith("step_00000002/tokenizer.model")
