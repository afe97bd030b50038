"""The arithmetic of PPO and GRPO on per-token tensors, with masks.

Every function takes (B, T) tensors over *response* positions and a boolean ``mask`` of the
same shape that is True on response tokens that were really sampled (up to and including
the first stop token). Prompt tokens, tokens after the stop and padding are False and never
enter a sum, a mean, a variance or a bootstrap.

KL estimators (John Schulman, "Approximating KL Divergence", 2020), per token, for a token
sampled from the policy pi, with log r = log ref(x) - log pi(x):
- ``k1`` = -log r = log pi - log ref: unbiased for KL(pi || ref), can be negative;
- ``k2`` = (log r)^2 / 2: biased, low variance, >= 0;
- ``k3`` = (r - 1) - log r: unbiased and >= 0 (GRPO's choice, DeepSeekMath).
PPO subtracts ``kl_coef * kl`` from every response token's reward (the per-token penalty,
InstructGPT / TRL); GRPO adds ``beta * k3`` to the loss instead.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean over True positions (0 where there are none)."""
    m = mask.to(x.dtype)
    n = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, mask, dim) / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over True positions (divides by their count)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and population variance over valid tokens only;
    invalid positions come out 0. ``shift_mean=False`` keeps the mean (rewards are scaled, not
    centred, when whitened)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the log-probs of the sampled tokens (see module)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r} ({' | '.join(KL_ESTIMATORS)})")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last True position (0 for an empty row)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(dim=1).values


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """PPO's per-token rewards: -kl_coef * kl on every response token, plus the sequence score
    on its last response token (the stop token, or the last one when cut at max_new_tokens)."""
    r = -kl_coef * kl * mask.to(kl.dtype)
    idx = last_index(mask)
    rows = torch.arange(len(scores), device=scores.device)
    r[rows, idx] += scores.to(r.dtype) * mask.any(dim=1).to(r.dtype)
    return r


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) along each row's valid tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, where V and A
    past the last valid token are 0 (the episode ends at the stop token or at max_new_tokens:
    no bootstrap from a value the policy never reached). Returns (advantages, returns =
    advantages + values), both 0 off the mask."""
    m = mask.to(values.dtype)
    B, T = values.shape
    adv = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = a
        next_value = values[:, t] * m[:, t]
        next_adv = a
    return adv, (adv + values) * m


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, the mean over valid tokens of
    max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)), ratio = exp(logp - old_logp).
    Metrics (detached): ``clip_frac``, the share of valid tokens where the clipped term is the
    larger (its gradient is zero there), and ``approx_kl`` = mean k3(old, new)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
        approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)
    return loss, {"clip_frac": clip_frac, "approx_kl": approx_kl}


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped value loss: 0.5 * mean over valid tokens of max((V - R)^2, (V_clip - R)^2)
    with V_clip = old_V + clamp(V - old_V, -clip, clip). ``value_clip_frac``: share where the
    clipped term is the larger."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    a, b = (values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(a, b), mask)
    with torch.no_grad():
        frac = masked_mean((b > a).to(values.dtype), mask)
    return loss, {"value_clip_frac": frac}


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: each score minus its group's mean, over the group's standard deviation (Bessel-
    corrected, as DeepSeekMath and TRL compute it) plus ``eps``. Rows are grouped in order:
    rows [g * G, (g + 1) * G) are the G samples of prompt g. A group of equal scores gives 0."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    g = scores.view(-1, group_size).to(torch.float64)
    std = g.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).view(-1).to(scores.dtype)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip: float, beta: float) -> tuple[torch.Tensor, dict]:
    """GRPO: the clipped surrogate with each sequence's advantage on all its tokens, plus
    beta * k3(pi, ref) per token; mean over the batch's valid tokens."""
    adv = advantages[:, None].expand_as(logp)
    surrogate, metrics = policy_loss(logp, old_logp, adv, mask, clip)
    kl = kl_estimate(logp, ref_logp, "k3")
    kl_mean = masked_mean(kl, mask)
    return surrogate + beta * kl_mean, {**metrics, "kl": kl_mean.detach()}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits), in nats: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over valid tokens: 1 is a perfect critic, 0 one that predicts
    the mean, negative worse than that. NaN when the returns do not vary."""
    var_r = masked_var(returns, mask)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_r)
