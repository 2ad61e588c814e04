"""PPO with a learned critic, the maths (pure torch): per-token rewards, GAE, returns, the clipped value loss.

GRPO's group baseline replaces exactly this (DeepSeekMath section 4.1.1): PPO estimates advantages with
GAE (Schulman et al. 2016, eq. 16) from a value model's per-token values and per-token rewards, in the
InstructGPT arrangement that OpenRLHF and veRL follow: the sequence's reward on its last response token
and, with the KL penalty in the reward, ``-beta * KL_t`` on every response token. These functions are
the estimator (registered as ``algo.advantage: gae``, :func:`gae_advantages`) and the critic's loss
(``troupe.learner.critic_rank.CriticRank`` trains with it).

Tensor convention (as ``troupe.learner.registry``): [B, T] over response tokens, ``mask`` 1 on tokens that
count (a truncated or padded tail is 0, and the last token with mask 1 is the sequence's end).
Imports torch only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from troupe.configs.algos import GAEAdvantage
from troupe.learner.registry import AdvantageInputs, register_advantage

__all__ = ["critic_metrics", "explained_variance", "gae", "gae_advantages", "gae_returns", "token_rewards",
           "value_loss", "whiten"]


def _check(name: str, x: Tensor, like: Tensor) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} must be [B, T] = {tuple(like.shape)}, got {tuple(x.shape)}")


def token_rewards(rewards: Tensor, mask: Tensor, kl: Optional[Tensor] = None, kl_coef: float = 0.0) -> Tensor:
    """Per-token rewards: ``rewards[b]`` on row b's last token with mask 1, ``-kl_coef * kl[b, t]`` on every
    token with mask 1 (InstructGPT; OpenRLHF ``compute_reward``), 0 elsewhere.

    Args:
        rewards: [B] sequence rewards (finite).
        mask: [B, T] response mask (0/1).
        kl: [B, T] per-token KL estimate to the reference (e.g. k1 = logp - ref_logp), or None.
        kl_coef: beta >= 0.
    Returns:
        [B, T] float32 (float64 for float64 rewards).
    Raises:
        ValueError: shapes that do not match, a negative kl_coef.
    """
    if rewards.dim() != 1 or mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"rewards must be [B] and mask [B, T], got {tuple(rewards.shape)} and {tuple(mask.shape)}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    m = mask.to(dtype)
    T = mask.shape[1]
    # the last token with mask 1: the largest index t with m[t] = 1 (rows without one get no reward)
    last = (m * torch.arange(1, T + 1, dtype=dtype)).argmax(dim=1)
    out = torch.zeros_like(m)
    has = m.sum(dim=1) > 0
    out[has, last[has]] = rewards.to(dtype)[has]
    if kl is not None and kl_coef:
        _check("kl", kl, mask)
        out = out - kl_coef * kl.to(dtype) * m
    return out


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over response tokens; the value after a row's last token is 0.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}  (Schulman et al. 2016,
    eq. 16), with r and V multiplied by the mask first, as OpenRLHF's ``get_advantages_and_returns``
    does; returns R_t = A_t + V_t (the critic's targets). ``gamma = lam = 1``: A_t = sum_{k>=t} r_k - V_t,
    the Monte-Carlo return minus the value baseline.

    Args:
        token_rewards: [B, T] (``token_rewards``).
        values: [B, T] the critic's values of the response tokens (detached).
        mask: [B, T] 0/1.
        gamma: discount in [0, 1]; lam: GAE lambda in [0, 1].
    Returns:
        (advantages [B, T], returns [B, T]), 0 where the mask is 0, in the rewards' float dtype.
    Raises:
        ValueError: shapes that do not match, gamma or lam outside [0, 1].
    """
    _check("values", values, token_rewards)
    _check("mask", mask, token_rewards)
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma} and {lam}")
    m = mask.to(token_rewards.dtype)
    r, v = token_rewards * m, values.detach().to(token_rewards.dtype) * m
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        next_v = v[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + v) * m


def whiten(advantages: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(A - mean) / (std + eps) over the tokens with mask 1 of the whole batch (population std), 0 elsewhere
    (PPO's advantage normalisation; OpenRLHF ``masked_normalize``). Raises ValueError on shapes."""
    _check("mask", mask, advantages)
    m = mask.to(advantages.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (advantages * m).sum() / n
    var = (((advantages - mean) * m) ** 2).sum() / n
    return (advantages - mean) / (var.sqrt() + eps) * m


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: Optional[float] = None) -> Tensor:
    """The critic's per-token loss 0.5 * (V - R)^2, or with ``clip`` PPO's clipped form
    0.5 * max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2) (OpenAI baselines ppo2, OpenRLHF
    ``ValueLoss``); 0 where the mask is 0. Aggregate it as the policy loss is aggregated.

    Args:
        values: [B, T] the critic's current values (requires grad).
        old_values: [B, T] its values when the batch was sampled (detached).
        returns: [B, T] targets (``gae``).
        mask: [B, T] 0/1.
        clip: epsilon > 0, or None (no clipping).
    Returns:
        [B, T] per-token loss.
    Raises:
        ValueError: shapes that do not match, clip <= 0.
    """
    for name, x in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        _check(name, x, values)
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    m = mask.to(values.dtype)
    loss = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss = torch.maximum(loss, (clipped - returns) ** 2)
    return 0.5 * loss * m


def _advantages_and_returns(inp: AdvantageInputs, cfg: GAEAdvantage) -> tuple[Tensor, Tensor]:
    if inp.values is None:
        raise ValueError("algo.advantage 'gae' needs the critic's values of the batch (AdvantageInputs.values): "
                         "the run needs a critic section")
    mask = inp.response_mask
    r = token_rewards(torch.nan_to_num(inp.rewards.double(), nan=0.0), mask)
    if inp.token_rewards is not None:
        _check("token_rewards", inp.token_rewards, mask)
        r = r + inp.token_rewards.to(r.dtype) * mask.to(r.dtype)
    return gae(r, inp.values.to(r.dtype), mask, cfg.gamma, cfg.lam)


@register_advantage("gae", GAEAdvantage)
def gae_advantages(inp: AdvantageInputs, cfg: GAEAdvantage) -> Tensor:
    """The registered estimator: GAE advantages [B, T] from the sequence rewards (on the last token), the
    per-token reward terms and the critic's values, whitened over the batch when ``cfg.whiten``; computed in
    float64, returned in the mask's dtype.
    Excluded samples (NaN reward) have mask 0 and get 0. Raises ValueError without ``inp.values``."""
    adv, _ = _advantages_and_returns(inp, cfg)
    adv = whiten(adv, inp.response_mask.to(adv.dtype)) if cfg.whiten else adv
    return adv.to(inp.response_mask.dtype)


def gae_returns(inp: AdvantageInputs, cfg: GAEAdvantage) -> Tensor:
    """The critic's targets [B, T] (the mask's dtype): GAE advantages (before whitening) + values; 0 where the
    mask is 0."""
    return _advantages_and_returns(inp, cfg)[1].to(inp.response_mask.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the tokens with mask 1 (population variances): 1 when the critic predicts
    the returns, 0 when it predicts no better than their mean, negative when worse; NaN when Var(R) = 0."""
    m = mask.bool()
    r, v = returns[m].double(), values[m].double()
    if r.numel() == 0:
        return float("nan")
    var = r.var(unbiased=False)
    return float("nan") if var == 0 else float(1.0 - (r - v).var(unbiased=False) / var)


def critic_metrics(values: Tensor, returns: Tensor, mask: Tensor) -> dict[str, float]:
    """A step's critic diagnostics over the response tokens with mask 1: "critic/explained_variance"
    (:func:`explained_variance`), "critic/values_mean", "critic/returns_mean". All [B, T]."""
    m = mask.to(torch.float64)
    n = float(m.sum().clamp(min=1.0))
    return {"critic/explained_variance": explained_variance(values, returns, mask),
            "critic/values_mean": float((values.double() * m).sum()) / n,
            "critic/returns_mean": float((returns.double() * m).sum()) / n}
