"""IPO on log-probs averaged per reply token (``dpo.ipo_logps=mean``, the default, as TRL
computes it) or summed (``sum``), against hand-computed values; DPO is unchanged by the key;
at step 0 (policy = reference) the DPO loss is ln 2, the IPO loss 1/(4 beta^2) and the
implicit-reward margins 0. The task's forward (train/tasks/preference.py) is run on a real
tiny model and checked against per-token log-probs summed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from model.llama import ModelConfig, Transformer
from train.sft.preference import loss_logprobs, preference_loss


def test_ipo_averages_per_reply_token_and_sum_keeps_the_sums():
    # Two pairs: summed log-probs and reply lengths (chosen 4 and 2 tokens, rejected 5 and 3).
    pc, pr = torch.tensor([-10.0, -6.0]), torch.tensor([-14.0, -9.0])
    rc, rr = torch.tensor([-12.0, -7.0]), torch.tensor([-13.0, -7.5])
    targets = torch.full((4, 6), -100)
    for row, n in enumerate([4, 2, 5, 3]):  # rows: chosen of each pair, then rejected
        targets[row, 6 - n:] = 7
    beta = 0.5
    mean_h = [(-10 / 4 + 12 / 4) - (-14 / 5 + 13 / 5), (-6 / 2 + 7 / 2) - (-9 / 3 + 7.5 / 3)]  # [0.7, 1.0]
    sum_h = [(-10 + 12) - (-14 + 13), (-6 + 7) - (-9 + 7.5)]  # [3.0, 2.5]
    want_mean = sum((h - 1 / (2 * beta)) ** 2 for h in mean_h) / 2
    want_sum = sum((h - 1 / (2 * beta)) ** 2 for h in sum_h) / 2
    assert want_mean == pytest.approx(0.045) and want_sum == pytest.approx(3.125)

    def loss(kind, mode):
        pol = loss_logprobs(torch.cat([pc, pr]), targets, kind, mode)
        ref = loss_logprobs(torch.cat([rc, rr]), targets, kind, mode)
        return float(preference_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta, kind)[0])

    assert loss("ipo", "mean") == pytest.approx(want_mean, rel=1e-6)
    assert loss("ipo", "sum") == pytest.approx(want_sum, rel=1e-6)
    want_dpo = sum(-math.log(1 / (1 + math.exp(-beta * h))) for h in sum_h) / 2
    assert loss("dpo", "mean") == loss("dpo", "sum") == pytest.approx(want_dpo, rel=1e-6)  # DPO: always sums
    with pytest.raises(ValueError, match="ipo_logps"):
        loss_logprobs(pc, targets[:2], "ipo", "median")


def _task(loss: str, ipo_logps: str = "mean", beta: float = 0.5):
    from train.tasks.preference import PreferenceTask

    cfg = OmegaConf.create({"init_from": "hf:unused", "lora": {"enabled": False},
                            "dpo": {"loss": loss, "beta": beta, "label_smoothing": 0.0, "ipo_logps": ipo_logps}})
    return PreferenceTask(cfg)


@pytest.fixture(scope="module")
def tiny_batch():
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=16)
    model = Transformer(mc).eval()
    x = torch.randint(1, 64, (4, 10))
    y = torch.randint(1, 64, (4, 10))
    reply = [3, 5, 4, 2]  # reply tokens per row (chosen 0, 1; rejected 2, 3), then padding
    for row, n in enumerate(reply):
        y[row, :5] = -100  # prompt
        y[row, 5 + n:] = -100  # padding
    with torch.no_grad():
        logits, _ = model(x)
    logp = torch.log_softmax(logits.double(), -1)
    by_hand = [sum(float(logp[r, t, y[r, t]]) for t in range(10) if y[r, t] != -100) for r in range(4)]
    return model, x, y, reply, by_hand


def test_the_task_applies_ipo_to_per_token_averages_of_the_models_log_probs(tiny_batch):
    model, x, y, reply, by_hand = tiny_batch
    ref = [s - 0.3 * (r + 1) for r, s in enumerate(by_hand)]  # a reference that differs per row
    beta = 0.5

    def ipo(values_pol, values_ref):
        h = [(values_pol[i] - values_ref[i]) - (values_pol[2 + i] - values_ref[2 + i]) for i in range(2)]
        return sum((v - 1 / (2 * beta)) ** 2 for v in h) / 2

    extra = {"ref_logps": torch.tensor(ref, dtype=torch.float64)}
    with torch.no_grad():
        out_mean, loss_mean = _task("ipo", "mean", beta).forward(model, x, y, extra)
        _, loss_sum = _task("ipo", "sum", beta).forward(model, x, y, extra)
    avg = [v / n for v, n in zip(by_hand, reply)]
    avg_ref = [v / n for v, n in zip(ref, reply)]
    assert float(loss_mean) == pytest.approx(ipo(avg, avg_ref), rel=1e-4)
    assert float(loss_sum) == pytest.approx(ipo(by_hand, ref), rel=1e-4)
    assert float(loss_mean) != pytest.approx(float(loss_sum), rel=1e-2)  # the two forms really differ here
    # The evaluation's implicit rewards are of the averaged log-probs too (TRL's IPO rewards).
    chosen, rejected = _task("ipo", "mean", beta).pair_scores(out_mean, 2)
    assert chosen.tolist() == pytest.approx([beta * (avg[i] - avg_ref[i]) for i in range(2)], rel=1e-4)
    assert rejected.tolist() == pytest.approx([beta * (avg[2 + i] - avg_ref[2 + i]) for i in range(2)], rel=1e-4)


@pytest.mark.parametrize("loss,mode,want", [("dpo", "mean", math.log(2)), ("ipo", "mean", 1.0),
                                            ("ipo", "sum", 1.0)])
def test_at_step_zero_the_loss_is_ln2_for_dpo_and_a_quarter_over_beta_squared_for_ipo(tiny_batch, loss, mode, want):
    """Policy = reference (the reference pass gives the policy's own log-probs): every h is 0,
    so DPO gives ln 2, IPO (h - 1/(2 beta))^2 = 1/(4 beta^2) = 1 at beta 0.5, margins 0."""
    model, x, y, _, by_hand = tiny_batch
    task = _task(loss, mode, beta=0.5)
    with torch.no_grad():
        out, value = task.forward(model, x, y, {"ref_logps": torch.tensor(by_hand, dtype=torch.float64)})
    assert float(value) == pytest.approx(want, abs=1e-5)
    chosen, rejected = task.pair_scores(out, 2)
    assert (chosen - rejected).abs().max() < 1e-5


def test_an_unknown_ipo_logps_is_a_config_error_naming_the_key(tmp_path):
    from tests.sft_helpers import sft_cfg
    from train.config import ConfigError

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ConfigError) as e:
        sft_cfg(tmp_path / "run", str(tmp_path), [pairs], "task=preference", "dpo.loss=ipo", "dpo.ipo_logps=median")
    assert "dpo.ipo_logps" in str(e.value)
