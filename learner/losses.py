"""KL estimators, the registered policy losses (``ppo_clip``, ``gspo``), what every loss shares
(``policy_loss``: TIS weight, KL term, split-invariant aggregation) and entropy (pure torch).
Re-exported by ``troupe.learner.grpo``, whose docstring states every algorithmic choice.

Per-token tensors are [B, T] over response tokens only; ``response_mask`` [B, T] (bool or float)
is 1 on tokens that count. Values at masked positions never reach the loss or the metrics (they
are selected away with ``torch.where``, so even NaN/inf padding is harmless).

Imports torch and troupe's config classes / registry only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from troupe.configs.algos import GSPOLoss, PolicyLossConfig, PPOClipLoss
from troupe.learner.registry import LossInputs, policy_loss_fn, register_policy_loss

LOG_RATIO_CLAMP = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


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


def token_kl(logp_old: Tensor, ref_logp: Tensor, response_mask: Tensor, estimator: str) -> Tensor:
    """Per-token KL for KL in the reward with a critic (InstructGPT; OpenRLHF ``compute_reward``):
    ``mask * KL_t(logp_old, ref_logp)``, without gradient; ``troupe.learner.step`` puts -kl_coef times it on
    every response token.

    Args:
        logp_old: [B, T] log pi_old of the sampled tokens (learner, before the update).
        ref_logp: [B, T] log pi_ref.
        response_mask: [B, T] bool/float.
        estimator: "k1" | "k2" | "k3" (see ``kl_estimate``).
    Returns:
        [B, T] float32 (float64 for float64 inputs), 0 where the mask is 0, detached.
    Raises:
        ValueError: shape mismatch, unknown estimator.
    """
    _check_same_shape(logp_old=logp_old, ref_logp=ref_logp, response_mask=response_mask)
    with torch.no_grad():
        dtype = torch.float64 if logp_old.dtype == torch.float64 else torch.float32
        kl = kl_estimate(logp_old.detach().to(dtype), ref_logp.detach().to(dtype), estimator)
        return _masked(kl, response_mask.to(kl.dtype))


def sequence_kl(logp_old: Tensor, ref_logp: Tensor, response_mask: Tensor, estimator: str) -> Tensor:
    """Per-sequence KL for KL in the reward (``kl_in="reward"``, PPO's way as in OpenRLHF):
    sum_t mask_{i,t} * KL_t(logp_old, ref_logp) (:func:`token_kl` summed), without gradient.
    ``troupe.learner.step`` then subtracts kl_coef times it from each sequence's reward before advantages.

    Args: as :func:`token_kl`.
    Returns:
        [B] float32 (float64 for float64 inputs), detached.
    Raises:
        ValueError: shape mismatch, unknown estimator.
    """
    return token_kl(logp_old, ref_logp, response_mask, estimator).sum(dim=1)


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

    Example (docs/design.md, hand-derived values): A = [1, -1, 1, -1], rho = [1.5, 1.5, 0.5, 0.5], clip 0.2/0.28
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


@dataclass(frozen=True)
class LossNorm:
    """How a micro-batch's per-token loss becomes its share of the mini-batch loss (``aggregate_loss``).

    Attributes:
        mode: "token_mean" | "seq_mean_token_mean" | "seq_mean_token_sum_norm" (algo.loss_agg).
        num_tokens: valid tokens of the whole mini-batch on all ranks.
        num_seqs: sequences with a valid token in the whole mini-batch on all ranks.
        max_len: Dr.GRPO's constant (rollout.max_new_tokens).
    """

    mode: str
    num_tokens: float
    num_seqs: float
    max_len: int


def _ratio_metrics(ratio: Tensor, adv: Tensor, mask: Tensor, clip_low: float, clip_high: float) -> dict[str, Tensor]:
    """Clip fractions (A < 0 and rho < 1 - clip_low; A > 0 and rho > 1 + clip_high) and mean ratio."""
    r = ratio.detach()
    return {
        "clip_frac_low": _masked_mean(((adv < 0) & (r < 1.0 - clip_low)).float(), mask),
        "clip_frac_high": _masked_mean(((adv > 0) & (r > 1.0 + clip_high)).float(), mask),
        "ratio_mean": _masked_mean(r, mask),
    }


@register_policy_loss("ppo_clip", PPOClipLoss)
def ppo_clip_loss(inp: LossInputs, cfg: PPOClipLoss) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO/GRPO clipped surrogate with a per-token ratio (DeepSeekMath eq. 3, negated).

    rho_{i,t} = exp(clamp(logp - old_logp, -20, 20)); l = ``clipped_surrogate(rho, A, clip_low,
    clip_high, dual_clip)`` (DAPO clip-higher, dual clip for A < 0).

    Returns:
        ([B, T] per-token loss, metrics "clip_frac_low", "clip_frac_high", "ratio_mean" and, with
        dual clip, "dual_clip_frac" (A < 0 and rho > c)).
    """
    ratio = torch.exp((inp.logp - inp.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss = clipped_surrogate(ratio, inp.advantages, cfg.clip_low, cfg.clip_high, cfg.dual_clip)
    metrics = _ratio_metrics(ratio, inp.advantages, inp.response_mask, cfg.clip_low, cfg.clip_high)
    if cfg.dual_clip is not None:
        hit = (inp.advantages < 0) & (ratio.detach() > cfg.dual_clip)
        metrics["dual_clip_frac"] = _masked_mean(hit.float(), inp.response_mask)
    return loss, metrics


@register_policy_loss("gspo", GSPOLoss)
def gspo_loss(inp: LossInputs, cfg: GSPOLoss) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO (arXiv 2507.18071) in its GSPO-token form.

    s_i = exp(sum_t m lr / max(1, sum_t m)) with lr = clamp(logp - old_logp, -20, 20);
    rho_{i,t} = sg(s_i) * exp(logp - sg(logp)): equal to s_i in value, gradient s_i * grad log
    pi_theta(y_{i,t}) (GSPO's gradient when advantages are per sequence); then the clipped surrogate.

    Returns:
        ([B, T] per-token loss, metrics "clip_frac_low", "clip_frac_high", "ratio_mean").
    """
    mask = inp.response_mask
    log_ratio = (inp.logp - inp.old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    seq = torch.exp(_masked(log_ratio, mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).detach()  # [B]
    ratio = seq.unsqueeze(1) * torch.exp(inp.logp - inp.logp.detach())
    loss = clipped_surrogate(ratio, inp.advantages, cfg.clip_low, cfg.clip_high)
    return loss, _ratio_metrics(ratio, inp.advantages, mask, cfg.clip_low, cfg.clip_high)


def _clean_inputs(inp: LossInputs) -> LossInputs:
    """Inputs in logp's float dtype with every masked position set to 0 (padding, even NaN/inf,
    then gets ratio 1, KL 0, TIS weight 1 and exactly zero gradient); old/ref/sampling/advantages
    detached."""
    logp = inp.logp if inp.logp.dtype in (torch.float32, torch.float64) else inp.logp.float()
    keep = inp.response_mask != 0
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)

    def clean(x: Optional[Tensor], detach: bool = True) -> Optional[Tensor]:
        if x is None:
            return None
        return torch.where(keep, (x.detach() if detach else x).to(logp.dtype), zero)

    return LossInputs(clean(logp, detach=False), clean(inp.old_logp), clean(inp.advantages),
                      inp.response_mask.to(logp.dtype), clean(inp.sampling_logp), clean(inp.ref_logp))


def _check_loss_args(inp: LossInputs, tis_cap: Optional[float], kl_coef: float, kl_estimator: str) -> None:
    _check_same_shape(logp=inp.logp, old_logp=inp.old_logp, advantages=inp.advantages,
                      response_mask=inp.response_mask, sampling_logp=inp.sampling_logp, ref_logp=inp.ref_logp)
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
    if not (kl_coef >= 0.0) or math.isinf(kl_coef):
        raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}")
    if kl_coef > 0 and inp.ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference model's log-probs)")
    if tis_cap is not None:
        if not (tis_cap > 0.0):
            raise ValueError(f"tis_cap must be > 0 (or None), got {tis_cap}")
        if inp.sampling_logp is None:
            raise ValueError("tis_cap is set but sampling_logp is None: TIS needs the engine log-probs")


def policy_loss(
    inp: LossInputs,
    cfg: PolicyLossConfig,
    norm: LossNorm,
    *,
    tis_cap: Optional[float] = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch's share of the policy loss: the registered loss ``cfg.name`` plus what every
    loss shares.

    1. masked positions of every input set to 0 (``_clean_inputs``); bf16/fp16 logp upcast to float32.
    2. l_{i,t}, metrics = registered_fn(inputs, cfg)   (``ppo_clip``, ``gspo``, or a plugin's).
    3. truncated importance sampling (Yao et al. 2025) when ``tis_cap`` is set:
       l_{i,t} *= w_{i,t} = min(exp(clamp(old_logp - sampling_logp, -20, 20)), tis_cap), detached.
    4. KL in the loss when ``kl_coef`` > 0 (GRPO, DeepSeekMath eq. 3; not TIS-weighted):
       l_{i,t} += kl_coef * kl_estimate(logp, ref_logp, kl_estimator).
    5. loss = aggregate_loss(l, mask, norm.mode, ...) with whole-mini-batch normalisers, so summing
       over micro-batches and ranks gives the mini-batch loss whatever the split.

    Args:
        inp: [B, T] tensors (``LossInputs``); logp requires grad.
        cfg: the policy loss's typed config (``troupe.configs.algos``).
        norm: aggregation mode and global normalisers (``LossNorm``).
        tis_cap: cap C > 0 of the truncated importance weight, or None (off).
        kl_coef: beta >= 0; kl_estimator: "k1" | "k2" | "k3".
    Returns:
        (loss scalar with grad, metrics): detached float scalars, masked means over this micro-batch:
        the registered loss's own (e.g. "clip_frac_low", "clip_frac_high", "ratio_mean"), "pg_loss"
        (surrogate incl. TIS weight), "kl_loss" (kl_coef * kl_ref), "approx_kl_old" (k3 of current vs
        old) and when applicable "kl_ref", "tis_weight_mean", "sampling_kl" (k3 of old vs sampling).
    Raises:
        ValueError: shape mismatch, unknown loss/loss_agg/kl_estimator, kl_coef > 0 without ref_logp,
        tis_cap without sampling_logp, tis_cap <= 0, the registered loss's own errors.
    """
    _check_loss_args(inp, tis_cap, kl_coef, kl_estimator)
    if norm.mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {norm.mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    x = _clean_inputs(inp)
    mask = x.response_mask
    pg, metrics = policy_loss_fn(cfg.name)(x, cfg)
    if x.sampling_logp is not None:
        metrics["sampling_kl"] = _masked_mean(kl_estimate(x.old_logp, x.sampling_logp, "k3"), mask)
        if tis_cap is not None:
            w = torch.exp((x.old_logp - x.sampling_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).clamp(max=tis_cap)
            pg = pg * w.detach()
            metrics["tis_weight_mean"] = _masked_mean(w, mask)
    total, kl_term = pg, torch.zeros((), dtype=torch.float32, device=x.logp.device)
    if x.ref_logp is not None:
        kl = kl_estimate(x.logp, x.ref_logp, kl_estimator)
        metrics["kl_ref"] = _masked_mean(kl, mask)
        if kl_coef > 0:
            total, kl_term = pg + kl_coef * kl, kl_coef * metrics["kl_ref"]
    loss = aggregate_loss(total, mask, norm.mode, num_tokens=norm.num_tokens, num_seqs=norm.num_seqs,
                          max_len=norm.max_len)
    metrics.update(pg_loss=_masked_mean(pg, mask), kl_loss=kl_term.detach(),
                   approx_kl_old=_masked_mean(kl_estimate(x.logp.detach(), x.old_logp, "k3"), mask))
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
