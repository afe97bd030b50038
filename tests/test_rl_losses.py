"""PPO / GRPO arithmetic against values computed by hand (the numbers in the comments)."""

import math

import pytest
import torch

from train.rl import losses as L

M = torch.tensor([[True, True, True, False]])


def test_gae_hand_computed_and_ignores_tokens_after_the_mask():
    # gamma 0.9, lam 0.8: delta2 = 1 - 0.4 = 0.6; delta1 = 0.9*0.4 - 0.2 = 0.16; delta0 = 0.9*0.2 - 0.5 = -0.32
    # A2 = 0.6; A1 = 0.16 + 0.72*0.6 = 0.592; A0 = -0.32 + 0.72*0.592 = 0.10624
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]], dtype=torch.float64)
    adv, ret = L.gae(rewards, values, M, gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([0.10624, 0.592, 0.6, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.60624, 0.792, 1.0, 0.0])


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.5, 0.5, 0.0]], dtype=torch.float64)
    adv, ret = L.gae(rewards, values, M, 1.0, 1.0)
    assert ret.tolist()[0] == pytest.approx([6.0, 5.0, 3.0, 0.0])
    assert adv.tolist()[0] == pytest.approx([5.5, 4.5, 2.5, 0.0])


def test_clipped_surrogate_hand_computed():
    # ratios 1.5, 0.5, 1.1 (masked 4th); A = 1, 1, -2; clip 0.2
    # max(-1.5, -1.2) = -1.2 (clipped); max(-0.5, -0.8) = -0.5; max(2.2, 2.2) = 2.2 -> mean 0.5/3
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]], dtype=torch.float64))
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, 1.0, -2.0, 100.0]], dtype=torch.float64)
    loss, m = L.policy_loss(logp, old, adv, M, clip=0.2)
    assert float(loss) == pytest.approx(0.5 / 3)
    assert float(m["clip_frac"]) == pytest.approx(1 / 3)


def test_clipped_surrogate_gradient_is_zero_where_clipped():
    logp = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64)).requires_grad_()
    loss, _ = L.policy_loss(logp, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64),
                            torch.ones(1, 2, dtype=torch.bool), 0.2)
    loss.backward()
    # token 0 clipped: no gradient; token 1: d(-ratio)/dlogp / 2 = -0.5 / 2
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.25])


def test_clipped_value_loss_hand_computed():
    # token 0: V 1.0, old 0.5 -> V_clip 0.7; (1-2)^2 = 1 < (0.7-2)^2 = 1.69; token 1: 1 and 1 -> 0.5 * (1.69 + 1) / 2
    values = torch.tensor([[1.0, 0.0, 3.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.0, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    loss, m = L.value_loss(values, old, ret, torch.tensor([[True, True, False]]), clip=0.2)
    assert float(loss) == pytest.approx(0.6725)
    assert float(m["value_clip_frac"]) == pytest.approx(0.5)


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    ln2 = math.log(2)
    assert L.kl_estimate(logp, ref, "k1").tolist() == pytest.approx([ln2, -ln2], abs=1e-6)  # k1 can be negative
    assert L.kl_estimate(logp, ref, "k2").tolist() == pytest.approx([0.5 * ln2 ** 2] * 2, abs=1e-6)
    assert L.kl_estimate(logp, ref, "k3").tolist() == pytest.approx([-0.5 + ln2, 1.0 - ln2], abs=1e-6)
    with pytest.raises(ValueError, match="k4"):
        L.kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_the_exact_kl():
    torch.manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    x = torch.multinomial(p, 200_000, replacement=True)
    for kind in ("k1", "k3"):
        est = L.kl_estimate(p.log()[x], q.log()[x], kind).mean()
        assert float(est) == pytest.approx(exact, abs=0.01)


def test_per_token_penalty_and_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    r = L.token_rewards(torch.tensor([3.0, -1.0]), kl, mask, kl_coef=0.5)
    assert r[0].tolist() == pytest.approx([-0.05, -0.1, -0.15 + 3.0, 0.0])
    assert r[1].tolist() == pytest.approx([-0.05, -0.05, -0.05, -0.05 - 1.0])


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    w = L.whiten(x, M)  # mean 2, population variance 2/3 over the three valid tokens
    s = math.sqrt(1.5)
    assert w.tolist()[0] == pytest.approx([-s, 0.0, s, 0.0], abs=1e-6)
    assert L.whiten(x, M, shift_mean=False).tolist()[0] == pytest.approx([2 - s, 2.0, 2 + s, 0.0], abs=1e-6)


def test_group_normalised_advantages():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    a = L.group_advantages(scores, group_size=4)
    std = math.sqrt(1 / 3)  # Bessel-corrected std of (1, 0, 0, 1)
    expect = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1
    assert a.tolist()[:4] == pytest.approx([expect[0], expect[1], expect[1], expect[0]])
    assert a.tolist()[4:] == [0.0] * 4  # no spread, no signal
    with pytest.raises(ValueError, match="groups of 3"):
        L.group_advantages(scores, 3)


def test_grpo_loss_hand_computed():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    zeros = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = L.grpo_loss(zeros, zeros, zeros, adv, mask, clip=0.2, beta=0.1)
    assert float(loss) == pytest.approx(-1 / 3)  # tokens -1, -1, +1; ratio 1, KL 0
    ref = torch.full((2, 3), math.log(0.5), dtype=torch.float64)  # log r = -ln 2 on every token: k3 = ln2 - 0.5
    loss, m = L.grpo_loss(zeros, zeros, ref, adv, mask, clip=0.2, beta=0.1)
    assert float(m["kl"]) == pytest.approx(math.log(2) - 0.5)
    assert float(loss) == pytest.approx(-1 / 3 + 0.1 * (math.log(2) - 0.5))


def test_entropy_and_explained_variance():
    assert L.entropy(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    assert float(L.entropy(torch.tensor([0.0, -1e9]))) == pytest.approx(0.0, abs=1e-6)
    ret = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    assert L.explained_variance(ret, ret, M) == pytest.approx(1.0)
    assert L.explained_variance(torch.full((1, 4), 2.0), ret, M) == pytest.approx(0.0)
    assert L.explained_variance(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), ret, M) == pytest.approx(-3.0)
