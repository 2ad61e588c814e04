"""GRPO maths, pure torch: advantages, KL, the clipped policy loss, aggregation, reward shaping.

Imports torch, pydantic (the variants' typed configs) and the standard library only -- never ray,
vllm, deepspeed or transformers (tests/test_imports_cpu.py checks ``sys.modules``). The code lives
in ``troupe.learner.advantages`` (rewards -> advantages) and ``troupe.learner.losses`` (log-probs ->
loss); this module re-exports the interface the learner calls. Every choice is stated here.

Variants are chosen by config value from two registries (``troupe.learner.registry``): an
advantage estimator is ``fn(AdvantageInputs, cfg) -> [B, T]``, a policy loss is
``fn(LossInputs, cfg) -> (per-token loss [B, T], metrics)``; each has a typed config class
(``troupe.configs.algos``: ``algo.advantage: {name: grpo, std: unbiased, eps: 1e-6}``,
``algo.policy_loss: {name: ppo_clip, clip_low: 0.2, clip_high: 0.28}``).

Conventions
    B samples in contiguous groups of G (rows k*G .. k*G+G-1 answer prompt k). Per-token tensors
    are [B, T] over response tokens only; ``response_mask`` [B, T] is 1 on tokens that count.
    Rewards are [B] float; NaN = a sample that could not be scored ("exclude" failure policy).
    Every function returns a LOSS to minimise (the papers' objectives, negated).

Advantages (outcome rewards), ``compute_advantages`` (registered estimators, algo.advantage)
    grpo    A_i = (r_i - mean_g r) / (std_g r + eps)          DeepSeekMath arXiv 2402.03300, 4.1.2
            std: "unbiased" (N-1, default; veRL and TRL) or "population" (N); eps = 1e-6 by
            default (veRL; TRL uses 1e-4), added to the std, not under the square root.
    dr_grpo A_i = r_i - mean_g r (no std division)            Dr.GRPO arXiv 2503.20783
    rloo    A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean_g r)   Ahmadian et al. 2402.14740
    reinforce_pp_baseline  x_i = r_i - mean_g r, then whitened over every response token of the
            whole batch (token-weighted mean/std, as veRL masked_whiten / OpenRLHF)  arXiv 2501.03262
    NaN rewards are left out of their group's mean/std and get advantage 0. A group with fewer
    than 2 valid rewards, or whose valid rewards are all equal, gets exactly 0 (grpo, dr_grpo,
    rloo) -- then the policy-gradient loss and gradient are 0 (see ``ZERO_VARIANCE_MESSAGE``).
    Statistics are computed in float64; the [B] advantage is broadcast to [B, T] * response_mask.
    Process supervision, ``process_advantages`` (DeepSeekMath 4.1.3; algo.advantage "process"):
    all step rewards of a group are normalised together (same std/eps choices); token t gets the
    sum of the normalised rewards of the steps ending at or after t. Steps are the completion cut
    at reward.step_delimiter (``troupe.core.steps``); a step ends on the token that completes
    its delimiter and the last step on the last response token, so every token gets credit.
    Outcome terms (outcome reward functions, DAPO overlong penalty, KL in the reward) are added
    to the last step's reward (``add_to_last_step``). Dynamic sampling keeps groups whose step
    rewards are not all equal (``informative``: one rule for outcome and step rewards).

Importance ratio
    Log-ratio logp - old_logp is clamped to [-20, 20] before exp (no inf/NaN, finite gradients;
    the gradient is 0 beyond the clamp). old_logp = the learner's own log-probs before the first
    update of the step (not the engine's), so the first mini-batch of an on-policy step has rho = 1.
    policy_loss "ppo_clip": rho_{i,t} = pi_theta/pi_old per token (GRPO/PPO).
    policy_loss "gspo": GSPO arXiv 2507.18071: s_i = exp(mean_t log-ratio) over the response
    mask, broadcast to tokens as sg(s_i) * exp(logp - sg(logp)) (the GSPO-token form: same value,
    gradient s_i * grad log pi(y_t); equal to GSPO's when advantages are per-sequence); default
    clip range 3e-4 / 4e-4 (the paper's).

Clipping (``clipped_surrogate``)
    l = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A); asymmetric "clip-higher" defaults
    of ppo_clip: clip_low 0.2, clip_high 0.28 (DAPO arXiv 2503.14476). Optional dual clip (Ye et al. arXiv
    1912.09729): for A < 0, l = min(l, c |A|), c > 1.

Sampler/learner mismatch
    Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): with engine log-probs, each token's surrogate is multiplied by
    w = min(pi_old/pi_sampler, tis_cap) = min(exp(old_logp - sampling_logp), C), detached.

KL to the reference policy
    In the loss by default (GRPO; DeepSeekMath eq. 3): l_{i,t} += kl_coef * KL_t, not TIS-weighted,
    aggregated like the surrogate, differentiated directly (as DeepSeekMath, TRL, veRL).
    Estimators (Schulman, joschu.net/blog/kl-approx.html), d = clamp(logp - ref_logp, -20, 20):
    k1 = d, k2 = d^2/2, k3 = exp(-d) + d - 1 (default; = pi_ref/pi - log(pi_ref/pi) - 1, >= 0).
    Alternatively in the reward (kl_in="reward", PPO/OpenRLHF style): kl_coef * sum_t KL_t of the old
    policy is subtracted from each sequence's reward before advantages (``troupe.learner.step``;
    ``sequence_kl`` is the per-sequence sum).

Aggregation (``aggregate_loss``), normalisers taken over the whole mini-batch on all ranks so that
summing per-micro-batch results over micro-batches and ranks gives the full-batch loss:
    token_mean              sum_{i,t} l m / num_tokens                       (DAPO; default)
    seq_mean_token_mean     sum_i (sum_t l m / |o_i|) / num_seqs             (GRPO eq. 3)
    seq_mean_token_sum_norm sum_{i,t} l m / (num_seqs * max_len)             (Dr.GRPO; max_len =
                            rollout max_new_tokens)

Reward shaping (DAPO)
    Dynamic sampling keeps groups that are ``informative`` (DAPO 3.2): at least two valid rewards
    (step rewards for process supervision) that are not all equal.
    ``overlong_penalty``: soft overlong punishment, DAPO eq. 13, scaled by ``penalty``.

Entropy: ``entropy_from_logits`` = logsumexp(z) - sum softmax(z) z, nats, float32 or wider.
"""

from __future__ import annotations

from .advantages import (
    STD_MODES,
    ZERO_VARIANCE_MESSAGE,
    add_to_last_step,
    compute_advantages,
    dr_grpo_advantages,
    group_stats,
    grpo_advantages,
    informative,
    overlong_penalty,
    process_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from .losses import (
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    LOSS_AGG_MODES,
    LossNorm,
    aggregate_loss,
    clipped_surrogate,
    entropy_from_logits,
    gspo_loss,
    kl_estimate,
    policy_loss,
    ppo_clip_loss,
    sequence_kl,
)
from .registry import AdvantageInputs, LossInputs, register_advantage, register_policy_loss, registered

__all__ = [
    "KL_ESTIMATORS",
    "LOG_RATIO_CLAMP",
    "LOSS_AGG_MODES",
    "STD_MODES",
    "ZERO_VARIANCE_MESSAGE",
    "AdvantageInputs",
    "LossInputs",
    "LossNorm",
    "add_to_last_step",
    "aggregate_loss",
    "clipped_surrogate",
    "compute_advantages",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "group_stats",
    "grpo_advantages",
    "gspo_loss",
    "informative",
    "kl_estimate",
    "overlong_penalty",
    "policy_loss",
    "ppo_clip_loss",
    "process_advantages",
    "register_advantage",
    "register_policy_loss",
    "registered",
    "reinforce_pp_baseline_advantages",
    "rloo_advantages",
    "sequence_kl",
]
