"""One step's learner-side maths, between the scored batch and the update (pure torch).

    shaping  = DAPO overlong penalty [+ -kl_coef * sum_t KL_t when algo.kl_in == "reward"]   [B]
    rewards' = rewards + shaping             (step-reward estimators: shaping on the last step)
    A        = registered estimator algo.advantage (AdvantageInputs of the WHOLE batch)     [B, T]
    R        = critic estimators (gae): the critic's targets, A before whitening + values     [B, T]

With a critic the KL in the reward is per token (-kl_coef * KL_t on every response token, InstructGPT)
instead of summed onto the last one, and the critic's values come with the batch (``TrainBatch.values``).
    norms    = per mini-batch global normalisers (valid tokens, valid sequences on all ranks)

Every learner rank computes this on the whole batch (it is small next to the model) and takes its
own rows, so advantages that need batch statistics (group baselines, REINFORCE++ whitening) and
the split-invariant loss normalisers are exact whatever the number of ranks. Imports torch and
troupe's records, configs and maths only (no Ray, no DeepSpeed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from troupe.configs.schema import AlgoConfig
from troupe.core.types import Group, TrainBatch
from troupe.learner.advantages import add_to_last_step, compute_advantages, group_stats, informative, overlong_penalty
from troupe.learner.losses import LossNorm
from troupe.learner.registry import AdvantageInputs


def group_signal(group: Group, uses_step_rewards: bool) -> list[float]:
    """The values whose spread makes ``group`` informative: its samples' rewards, or all their step
    rewards for step-reward estimators (None = not scored)."""
    if uses_step_rewards:
        return [r for rs in group.step_rewards if rs for r in rs]
    return [r for r in group.rewards if r is not None]


def sequence_shaping(batch: TrainBatch, algo: AlgoConfig, max_new_tokens: int, kl: Optional[Tensor]) -> Tensor:
    """[B] per-sequence reward terms: DAPO soft overlong penalty (eq. 13) and, given ``kl`` ([B]
    ``troupe.learner.losses.sequence_kl`` of the old policy to the reference), -algo.kl_coef * kl
    (KL in the reward; NaN rewards of excluded samples stay NaN when added)."""
    shaping = torch.zeros(batch.size)
    if algo.overlong_buffer:
        shaping = shaping + overlong_penalty(batch.response_lengths.float(), max_new_tokens,
                                             algo.overlong_buffer, algo.overlong_penalty)
    if kl is not None:
        shaping = shaping - algo.kl_coef * kl.to(shaping.dtype).cpu()
    return shaping


def _inputs(batch: TrainBatch, algo: AlgoConfig, group_size: int, max_new_tokens: int,
            kl: Optional[Tensor], teacher_gap: Optional[Tensor] = None) -> tuple[AdvantageInputs, Tensor]:
    """The estimator's inputs of the whole batch and the shaped [B] rewards (``step_advantages``)."""
    critic = algo.advantage.uses_critic
    if critic and batch.values is None:
        raise ValueError(f"algo.advantage {algo.advantage.name!r} needs the critic's values of the batch "
                         "(TrainBatch.values): the run needs a critic section")
    shaping = sequence_shaping(batch, algo, max_new_tokens, None if critic else kl)
    rewards = batch.rewards + shaping
    steps = algo.advantage.uses_step_rewards
    if steps and batch.step_rewards is None:
        raise ValueError(f"algo.advantage {algo.advantage.name!r} needs step rewards but the scored groups carry "
                         "none (no reward function of kind 'process' ran)")
    per_token = -algo.kl_coef * kl.to(torch.float32).cpu() if critic and kl is not None else None
    if algo.advantage.uses_teacher:
        if teacher_gap is None:
            raise ValueError(f"algo.advantage {algo.advantage.name!r} needs the teacher's log-probs of the batch")
        per_token = teacher_gap.to(torch.float32).cpu()
    inp = AdvantageInputs(rewards, batch.response_mask, group_size,
                          add_to_last_step(batch.step_rewards, shaping) if steps else None,
                          batch.step_ends if steps else None, values=batch.values if critic else None,
                          token_rewards=per_token)
    return inp, rewards


def step_returns(batch: TrainBatch, algo: AlgoConfig, group_size: int, max_new_tokens: int,
                 kl: Optional[Tensor] = None) -> Tensor:
    """The critic's targets [B, T] of a critic estimator (``algo.advantage.uses_critic``): its advantages before
    whitening + the batch's values (``troupe.learner.gae.gae_returns``); arguments as ``step_advantages``.
    Raises ValueError for an estimator without a critic, or a batch without values."""
    if not algo.advantage.uses_critic:
        raise ValueError(f"algo.advantage {algo.advantage.name!r} has no critic, so no returns")
    from troupe.learner.gae import gae_returns

    return gae_returns(_inputs(batch, algo, group_size, max_new_tokens, kl)[0], algo.advantage)


def step_advantages(batch: TrainBatch, algo: AlgoConfig, group_size: int, max_new_tokens: int,
                    kl: Optional[Tensor] = None, teacher_gap: Optional[Tensor] = None) -> tuple[Tensor, dict[str, float]]:
    """Reward shaping, then ``algo.advantage`` over the whole batch.

    Args:
        batch: the whole step batch (B rows, groups of ``group_size`` contiguous); a critic estimator reads
            its ``values``.
        algo: the algorithm section (estimator config, shaping settings).
        group_size: G.
        max_new_tokens: the response cap (overlong shaping).
        kl: for KL in the reward, else None: [B] KL sums (``sequence_kl``), or for a critic estimator [B, T]
            per-token KL (``troupe.learner.losses.token_kl``).
        teacher_gap: teacher estimators (``uses_teacher``): [B, T] log pi_teacher - log pi_old of the sampled
            tokens, 0 where the mask is 0; else None.
    Returns:
        ([B, T] advantages, 0 where the response mask is 0; statistics: "reward_shaped_mean",
        "reward_shaped_std", "valid_frac", "zero_variance_frac" (groups that are not ``informative``
        under the estimator's signal), "adv/mean", "adv/std" (per-sequence token-mean advantage over
        valid samples) and, for step-reward estimators, "process/steps_mean").
    Raises:
        ValueError: a step-reward estimator without step rewards, a critic estimator without values, or the
            estimator's own errors.
    """
    inp, rewards = _inputs(batch, algo, group_size, max_new_tokens, kl, teacher_gap)
    steps = algo.advantage.uses_step_rewards
    adv = compute_advantages(inp, algo.advantage) * batch.response_mask
    stats = {f"reward_shaped_{k[len('reward_'):]}" if k.startswith("reward_") else k: v
             for k, v in group_stats(rewards, group_size).items()}
    if steps:
        per_group = [sum(batch.step_rewards[k:k + group_size], []) for k in range(0, batch.size, group_size)]
        stats["zero_variance_frac"] = sum(not informative(g) for g in per_group) / len(per_group)
        counts = [len(rs) for rs in batch.step_rewards if rs]
        stats["process/steps_mean"] = sum(counts) / max(1, len(counts))
    valid = batch.response_mask.sum(1) > 0
    seq_adv = adv.sum(1) / batch.response_mask.sum(1).clamp(min=1)
    if valid.sum() > 1:
        stats["adv/mean"], stats["adv/std"] = float(seq_adv[valid].mean()), float(seq_adv[valid].std())
    return adv, stats


def minibatch_norms(response_mask: Tensor, num_ranks: int, mini_batches: int, mode: str, max_len: int) -> list[LossNorm]:
    """Global loss normalisers of each mini-batch: valid tokens and valid sequences over all ranks.

    Rank r trains rows [r*B/R, (r+1)*B/R) and its mini-batch m is the m-th contiguous slice of them,
    so mini-batch m of the step is slice m of every rank's rows.

    Args:
        response_mask: [B, T] of the whole batch; B divisible by num_ranks * mini_batches.
    Returns:
        ``mini_batches`` ``LossNorm``s (counts clamped to >= 1).
    """
    mask = response_mask.reshape(num_ranks, mini_batches, -1, response_mask.shape[1])
    return [LossNorm(mode, max(1.0, float(mask[:, m].sum())), max(1.0, float((mask[:, m].sum(-1) > 0).sum())), max_len)
            for m in range(mini_batches)]
