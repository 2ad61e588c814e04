"""KL estimators, the clipped policy loss, aggregation and entropy (pure torch). Re-exported by
``troupe.learner.grpo``, whose docstring states every algorithmic choice.

Per-token tensors are [B, T] over response tokens only; ``response_mask`` [B, T] (bool or float)
is 1 on tokens that count. Values at masked positions never reach the loss or the metrics (they
are selected away with ``torch.where``, so even NaN/inf padding is harmless).

Imports torch, math and typing only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
RATIO_LEVELS = ("token", "sequence")


def _check_same_shape(**tensors: Optional[Tensor]) -> tuple[int, ...]:
    shape: Optional[tuple[int, ...]] = None
    first = ""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor [B, T], got {got}")
        if shape is None:
            shape, first = tuple(t.shape), name
        elif tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first} has {shape}")
    return shape or ()


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask with masked-out positions forced to exactly 0 (NaN/inf there cannot leak)."""
    return torch.where(mask != 0, x * mask, torch.zeros_like(x))


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Detached scalar: sum(x * mask) / max(sum(mask), 1)."""
    x = x.detach().float()
    m = mask.detach().float()
    return _masked(x, m).sum() / m.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# KL
# ---------------------------------------------------------------------------------------------


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from log-probs of sampled tokens (Schulman,
    "Approximating KL divergence", joschu.net/blog/kl-approx.html).

    With d = clamp(logp - ref_logp, -20, 20) (log pi_theta/pi_ref; the clamp keeps exp finite):
        k1 = d                          (unbiased, high variance, can be negative)
        k2 = d^2 / 2                    (biased, low variance)
        k3 = exp(-d) + d - 1            = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1
                                        (unbiased, low variance, >= 0; DeepSeekMath eq. 4)
    The clamp applies to every estimator (gradient 0 beyond |d| = 20).

    Args:
        logp: [B, T] (or any shape) log pi_theta of the sampled tokens; may require grad.
        ref_logp: same shape, log pi_ref (normally detached).
        estimator: "k1" | "k2" | "k3".
    Returns:
        Tensor of the same shape (unmasked; mask it yourself).
    Raises:
        ValueError: unknown estimator or shape mismatch.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ in shape")
    d = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.exp(-d) + d - 1.0


def reward_kl_penalty(
    rewards: Tensor,
    logp_old: Tensor,
    ref_logp: Tensor,
    response_mask: Tensor,
    kl_coef: float,
    estimator: str,
) -> Tensor:
    """KL in the reward (``kl_in="reward"``, PPO's way as in OpenRLHF, applied to outcome rewards).

    r'_i = r_i - kl_coef * sum_t mask_{i,t} * KL_t(logp_old, ref_logp), computed without gradient
    before advantages. NaN (excluded) rewards stay NaN.

    Args:
        rewards: [B] float.
        logp_old: [B, T] log pi_old of the sampled tokens (learner, before the update).
        ref_logp: [B, T] log pi_ref.
        response_mask: [B, T] bool/float.
        kl_coef: beta >= 0.
        estimator: "k1" | "k2" | "k3" (see ``kl_estimate``).
    Returns:
        [B] shaped rewards, rewards' dtype, detached.
    Raises:
        ValueError: shape mismatch, kl_coef < 0, unknown estimator.
    """
    _check_same_shape(logp_old=logp_old, ref_logp=ref_logp, response_mask=response_mask)
    if rewards.dim() != 1 or rewards.shape[0] != logp_old.shape[0]:
        raise ValueError(f"rewards must be [B={logp_old.shape[0]}], got {tuple(rewards.shape)}")
    if not (kl_coef >= 0.0) or math.isinf(kl_coef):
        raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}")
    with torch.no_grad():
        kl = kl_estimate(logp_old.detach().float(), ref_logp.detach().float(), estimator)
        kl_sum = _masked(kl, response_mask.to(kl.dtype)).sum(dim=1)
        return (rewards.detach().to(kl_sum.device) - kl_coef * kl_sum.to(rewards.dtype)).to(rewards.dtype)


# ---------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> Tensor:
    """Reduce a [B, T] per-token loss to this micro-batch's share of the mini-batch loss.

    The normalisers are mini-batch constants (over all micro-batches and data-parallel ranks), so
    SUMMING the results over micro-batches and ranks gives the full mini-batch loss exactly; do not
    average the results again (and divide gradients by nothing else).
        token_mean              (DAPO):   sum_{i,t} l*m / num_tokens
        seq_mean_token_mean     (GRPO eq. 3): sum_i [sum_t l*m / max(1, sum_t m_i)] / num_seqs
        seq_mean_token_sum_norm (Dr.GRPO):    sum_{i,t} l*m / (num_seqs * max_len)

    Args:
        per_token: [B, T] loss per token (may require grad).
        mask: [B, T] bool/float response mask; masked positions contribute exactly 0.
        mode: one of the three above.
        num_tokens: sum of mask over the whole mini-batch on all ranks (clamped to >= 1).
        num_seqs: number of sequences in the whole mini-batch on all ranks (clamped to >= 1).
        max_len: Dr.GRPO's constant, the rollout max_new_tokens (>= 1).
    Returns:
        Scalar tensor.
    Raises:
        ValueError: unknown mode, shape mismatch, negative num_tokens/num_seqs, max_len < 1.
    """
    _check_same_shape(per_token=per_token, mask=mask)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    if not (num_tokens >= 0) or not (num_seqs >= 0):
        raise ValueError(f"num_tokens and num_seqs must be >= 0, got {num_tokens}, {num_seqs}")
    if not (max_len >= 1):
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    m = mask.to(per_token.dtype)
    lm = _masked(per_token, m)
    if mode == "token_mean":
        return lm.sum() / max(float(num_tokens), 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = lm.sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return per_seq.sum() / max(float(num_seqs), 1.0)
    return lm.sum() / (max(float(num_seqs), 1.0) * float(max_len))


# ---------------------------------------------------------------------------------------------
# policy loss
# ---------------------------------------------------------------------------------------------


def clipped_surrogate(
    ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: Optional[float] = None,
) -> Tensor:
    """Per-token PPO clipped surrogate LOSS (to minimise), with clip-higher and optional dual clip.

    l = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)            (PPO; clip-higher: DAPO 3.1)
    dual clip (Ye et al., arXiv 1912.09729), for A < 0 only: l = min(l, -c * A) = min(l, c * |A|)

    Example (DESIGN.md): A = [1, -1, 1, -1], rho = [1.5, 1.5, 0.5, 0.5], clip 0.2/0.28
    -> [-1.28, 1.5, -0.5, 0.8].

    Args:
        ratio: [B, T] (any shape) importance ratio pi_theta/pi_old (may require grad).
        advantages: same shape.
        clip_low: eps_low in [0, 1]; clip_high: eps_high >= 0.
        dual_clip: c > 1, or None (off).
    Returns:
        Same shape as ratio.
    Raises:
        ValueError: shape mismatch, clip bounds out of range, dual_clip <= 1.
    """
    if ratio.shape != advantages.shape:
        raise ValueError(f"ratio {tuple(ratio.shape)} and advantages {tuple(advantages.shape)} differ in shape")
    if not (0.0 <= clip_low <= 1.0) or not (clip_high >= 0.0) or math.isinf(clip_high):
        raise ValueError(f"need 0 <= clip_low <= 1 and finite clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not (dual_clip > 1.0):
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    adv = advantages.detach().to(ratio.dtype)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -dual_clip * adv), loss)
    return loss


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: Optional[float] = None,
    ratio_level: str = "token",
    sampling_logp: Optional[Tensor] = None,
    tis_cap: Optional[float] = None,
    ref_logp: Optional[Tensor] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO/DAPO/Dr.GRPO/GSPO policy loss of one micro-batch (DeepSeekMath eq. 3, negated).

    1. log-ratio lr = clamp(logp - old_logp, -20, 20).
       ratio_level="token":    rho_{i,t} = exp(lr_{i,t}).
       ratio_level="sequence": GSPO (arXiv 2507.18071), GSPO-token form:
           s_i = exp(sum_t m lr / max(1, sum_t m)), rho_{i,t} = sg(s_i) * exp(logp - sg(logp)),
           equal to s_i in value, with gradient s_i * grad log pi_theta(y_{i,t}).
    2. l_{i,t} = clipped_surrogate(rho, A, clip_low, clip_high, dual_clip).
    3. truncated importance sampling (Yao et al. 2025) when sampling_logp and tis_cap are given:
       l_{i,t} *= w_{i,t} = min(exp(clamp(old_logp - sampling_logp, -20, 20)), tis_cap), detached.
    4. KL in the loss when ref_logp is given and kl_coef > 0:
       l_{i,t} += kl_coef * kl_estimate(logp, ref_logp, kl_estimator)  (not TIS-weighted).
    5. loss = aggregate_loss(l, response_mask, loss_agg, num_tokens=..., num_seqs=..., max_len=...).

    Args:
        logp: [B, T] log pi_theta of the sampled response tokens (requires grad); bf16/fp16 is
            upcast to float32 (the loss is float32, or float64 for float64 logp).
        old_logp: [B, T] learner log-probs before the first update of this step (detached).
        advantages: [B, T] (``compute_advantages`` / ``process_advantages`` output).
        response_mask: [B, T] bool/float.
        clip_low, clip_high, dual_clip: see ``clipped_surrogate``.
        ratio_level: "token" | "sequence".
        sampling_logp: [B, T] engine log-probs of the same tokens, or None.
        tis_cap: cap C > 0 of the truncated importance weight, or None (off).
        ref_logp: [B, T] reference log-probs, or None.
        kl_coef: beta >= 0.
        kl_estimator: "k1" | "k2" | "k3".
        loss_agg, num_tokens, num_seqs, max_len: see ``aggregate_loss``.
    Returns:
        (loss scalar with grad, metrics) -- metrics are detached float32 scalars, masked means over
        this micro-batch: "pg_loss" (surrogate incl. TIS weight), "kl_loss" (kl_coef * kl_ref),
        "clip_frac_low" (A < 0 and rho < 1 - clip_low), "clip_frac_high" (A > 0 and
        rho > 1 + clip_high), "approx_kl_old" (k3 of current vs old), "ratio_mean"; and when
        applicable "dual_clip_frac" (A < 0 and -rho*A > c*|A|), "kl_ref" (k-estimate vs ref),
        "tis_weight_mean" (TIS on), "sampling_kl" (k3 of old vs sampling_logp, whenever given).
    Raises:
        ValueError: shape mismatch, unknown ratio_level/loss_agg/kl_estimator, kl_coef > 0 without
        ref_logp, tis_cap without sampling_logp, tis_cap <= 0, bad clip bounds.
    """
    _check_same_shape(
        logp=logp, old_logp=old_logp, advantages=advantages, response_mask=response_mask,
        sampling_logp=sampling_logp, ref_logp=ref_logp,
    )
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; valid: {', '.join(RATIO_LEVELS)}")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {loss_agg!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if not (kl_coef >= 0.0) or math.isinf(kl_coef):
        raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference model's log-probs)")
    if tis_cap is not None:
        if not (tis_cap > 0.0):
            raise ValueError(f"tis_cap must be > 0 (or None), got {tis_cap}")
        if sampling_logp is None:
            raise ValueError("tis_cap is set but sampling_logp is None: TIS needs the engine log-probs")

    if logp.dtype not in (torch.float32, torch.float64):
        logp = logp.float()  # bf16/fp16 log-probs: ratios and exp in float32
    mask = response_mask.to(logp.dtype)
    keep = mask != 0

    def _clean(x: Tensor) -> Tensor:
        # masked positions -> 0 in every input, so padding (even NaN/inf) gets ratio 1, KL 0,
        # TIS weight 1 and exactly zero gradient.
        return torch.where(keep, x.to(logp.dtype), torch.zeros((), dtype=logp.dtype, device=logp.device))

    logp = _clean(logp)
    old = _clean(old_logp.detach())
    adv = _clean(advantages.detach())
    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    else:
        seq_lr = _masked(log_ratio, mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        s = torch.exp(seq_lr).detach()  # [B]
        ratio = s.unsqueeze(1) * torch.exp(logp - logp.detach())

    pg = clipped_surrogate(ratio, adv, clip_low, clip_high, dual_clip)
    metrics: dict[str, Tensor] = {}
    if sampling_logp is not None:
        samp = _clean(sampling_logp.detach())
        metrics["sampling_kl"] = _masked_mean(kl_estimate(old, samp, "k3"), mask)
        if tis_cap is not None:
            w = torch.exp((old - samp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=tis_cap).detach()
            pg = pg * w
            metrics["tis_weight_mean"] = _masked_mean(w, mask)

    total = pg
    kl_term_mean = torch.zeros((), dtype=torch.float32, device=logp.device)
    if ref_logp is not None:
        kl = kl_estimate(logp, _clean(ref_logp.detach()), kl_estimator)
        metrics["kl_ref"] = _masked_mean(kl, mask)
        if kl_coef > 0:
            total = pg + kl_coef * kl
            kl_term_mean = kl_coef * metrics["kl_ref"]

    loss = aggregate_loss(total, mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

    with torch.no_grad():
        r = ratio.detach()
        metrics["pg_loss"] = _masked_mean(pg, mask)
        metrics["kl_loss"] = kl_term_mean.detach()
        metrics["clip_frac_low"] = _masked_mean(((adv < 0) & (r < 1.0 - clip_low)).float(), mask)
        metrics["clip_frac_high"] = _masked_mean(((adv > 0) & (r > 1.0 + clip_high)).float(), mask)
        if dual_clip is not None:
            metrics["dual_clip_frac"] = _masked_mean(((adv < 0) & (r > dual_clip)).float(), mask)
        metrics["approx_kl_old"] = _masked_mean(kl_estimate(logp.detach(), old, "k3"), mask)
        metrics["ratio_mean"] = _masked_mean(r, mask)
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits) over the last axis, in nats.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v   (stable for large |z|; -inf logits, e.g. masked
    vocabulary entries, contribute 0 and give no NaN gradient). bf16/fp16 logits are computed in
    float32 (this materialises one float32 copy of [B, T, V]; chunk over T for huge vocabularies).

    Args:
        logits: [B, T, V] (any leading shape, V last).
    Returns:
        [B, T] float32 (float64 for float64 logits); differentiable.
    Raises:
        ValueError: logits with fewer than 1 dimension or V == 0.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., V] with V >= 1, got {tuple(logits.shape)}")
    z = logits if logits.dtype == torch.float64 else logits.float()
    p = torch.softmax(z, dim=-1)
    z_safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    return torch.logsumexp(z, dim=-1) - (p * z_safe).sum(dim=-1)
