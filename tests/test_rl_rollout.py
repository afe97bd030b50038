"""Rollouts: sampling-time log-probs, and the masks that keep prompt tokens, left padding and
everything after the first stop token out of every log-prob sum and off the reward position."""

import pytest
import torch

from model.llama import ModelConfig, Transformer, generate
from model.value_head import ValueModel
from train.rl.rollout import response_logprobs, response_mask, sample

torch.set_num_threads(1)
MC = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
STOPS = list(range(60, 64))  # a few stop ids: some rows stop early, some run to max_new_tokens


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    policy = Transformer(MC)
    critic = ValueModel(MC)
    torch.nn.init.normal_(critic.value.weight, std=0.5)
    return policy.requires_grad_(False), critic.requires_grad_(False)


@pytest.fixture(scope="module")
def rollout(models):
    g = torch.Generator().manual_seed(3)
    return sample(models[0], PROMPTS * 2, max_new_tokens=10, temperature=1.3, top_p=1.0, stop_ids=STOPS,
                  pad_id=0, generator=g, device=torch.device("cpu"))


def test_response_mask_keeps_tokens_through_the_first_stop_only():
    resp = torch.tensor([[3, 4, 9, 5, 9], [3, 3, 3, 3, 3], [9, 1, 1, 9, 1]])
    assert response_mask(resp, [9]).tolist() == [[True, True, True, False, False], [True] * 5,
                                                 [True, False, False, False, False]]


def test_rollout_has_early_stops_and_full_length_rows(rollout):
    lengths = rollout.response_lengths().tolist()
    assert min(lengths) < 10 and max(lengths) == 10, lengths  # the masks below are really exercised
    for row, n in zip(rollout.responses.tolist(), lengths):
        if n < 10:
            assert row[n - 1] in STOPS and all(t not in STOPS for t in row[:n - 1])


def test_sampling_time_logprobs_equal_a_training_forward_on_the_mask(models, rollout):
    lp, _ = response_logprobs(models[0], rollout, temperature=1.3)
    m = rollout.response_mask
    assert torch.allclose(lp[m], rollout.logprobs[m], atol=1e-5)
    assert (lp[~m] == 0).all() and (rollout.logprobs[~m] == 0).all()


def test_prompt_padding_and_after_stop_tokens_never_enter_logprobs_or_reward(models, rollout):
    policy, critic = models
    base_lp, _ = response_logprobs(policy, rollout, 1.3)
    base_score = critic.score(rollout.tokens, rollout.last_real_index(), position_ids=rollout.position_ids,
                              key_mask=rollout.key_mask)
    noisy = rollout.select(slice(None))
    g = torch.Generator().manual_seed(9)
    junk = torch.randint(1, MC.vocab_size, noisy.tokens.shape, generator=g)
    noisy.tokens = torch.where(noisy.key_mask, noisy.tokens, junk)  # change every padding / after-stop token
    assert not torch.equal(noisy.tokens, rollout.tokens)
    lp, _ = response_logprobs(policy, noisy, 1.3)
    assert torch.allclose(lp.sum(1), base_lp.sum(1), atol=1e-5)
    score = critic.score(noisy.tokens, noisy.last_real_index(), position_ids=noisy.position_ids,
                         key_mask=noisy.key_mask)
    assert torch.allclose(score, base_score, atol=1e-5)
    # The reward position is each row's last real token: scoring the row alone, unpadded, agrees.
    for i, (prompt, resp) in enumerate(zip(PROMPTS * 2, rollout.response_ids())):
        alone = torch.tensor([prompt + resp])
        assert float(critic.score(alone, torch.tensor([alone.shape[1] - 1]))) == pytest.approx(
            float(base_score[i]), abs=1e-5)


def test_top_p_near_zero_is_greedy(models):
    greedy = generate(models[0], PROMPTS, 6, temperature=0.0)
    r = sample(models[0], PROMPTS, 6, temperature=1.0, top_p=1e-6, stop_ids=[63], pad_id=0,
               generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    m = r.response_mask
    assert torch.equal(r.responses[m], greedy[m])
