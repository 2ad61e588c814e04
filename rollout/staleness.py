"""Bounded staleness: how many policy versions a group lags the learner, and which groups are too old.

A pipelined run (``rollout.max_staleness`` = N > 0) samples step s+1.. while the learner trains
step s, so a group can be drawn with weights older than the ones it is trained against. Every
``Sample`` carries the policy version its engine held (``Sample.policy_version``; versions are
step numbers: the engines hold version v after the weight sync that followed step v). When the
learner trains step s it holds version s - 1, so a group sampled with version v has

    staleness = (s - 1) - v        (0 = on-policy, the synchronous loop with sync.every = 1)

A group whose staleness exceeds N is dropped and counted, never trained on (prime-rl's
``async_level`` bound; veRL's one-step-off-policy is N = 1). The off-policy gap of the groups that
stay is covered by the truncated importance weight ``algo.tis_cap`` (Yao et al. 2025) computed
from the engines' sampling log-probs. Pure functions: no Ray, no torch.
"""

from __future__ import annotations

from troupe.core.types import Group


def group_staleness(group: Group, learner_version: int) -> int:
    """Policy versions ``group`` lags ``learner_version`` (its oldest sample counts).

    Args:
        group: a sampled group (each sample stamped with ``policy_version``).
        learner_version: the version the learner holds when it trains on the group (step - 1).
    Returns:
        ``learner_version - min(sample.policy_version)`` (>= 0 in a consistent run).
    Raises:
        ValueError: the group has no samples, or a sample is newer than the learner (a version
            stamp from another run or a bug in the version bookkeeping).
    """
    if not group.samples:
        raise ValueError("group_staleness: a group without samples")
    lag = learner_version - min(s.policy_version for s in group.samples)
    if lag < 0:
        raise ValueError(f"group_staleness: a sample has policy version "
                         f"{max(s.policy_version for s in group.samples)}, newer than the learner's {learner_version}")
    return lag


def split_stale(groups: list[Group], learner_version: int, max_staleness: int) -> tuple[list[Group], list[int]]:
    """The groups within the staleness bound, and the indices of those dropped.

    Args:
        groups: one step's groups, in order.
        learner_version: the learner's version at training time (step - 1).
        max_staleness: N >= 0; a group with staleness > N is dropped.
    Returns:
        (kept groups in order, indices into ``groups`` of the dropped ones).
    Raises:
        ValueError: ``max_staleness`` < 0, and ``group_staleness``'s errors.
    """
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    lags = [group_staleness(g, learner_version) for g in groups]
    return [g for g, lag in zip(groups, lags) if lag <= max_staleness], \
        [i for i, lag in enumerate(lags) if lag > max_staleness]


def staleness_metrics(groups: list[Group], learner_version: int, max_staleness: int, dropped: int) -> dict:
    """Per-step staleness metrics of the groups trained on.

    Returns ``staleness/mean`` and ``staleness/max`` over the groups, the histogram
    ``staleness/groups_<k>`` (groups with staleness k, for k = 0..max_staleness) and
    ``staleness/dropped_groups`` (``dropped``: groups over the bound this step, resampled).
    """
    lags = [group_staleness(g, learner_version) for g in groups]
    out = {f"staleness/groups_{k}": float(sum(1 for lag in lags if lag == k)) for k in range(max_staleness + 1)}
    out["staleness/mean"] = sum(lags) / len(lags) if lags else 0.0
    out["staleness/max"] = float(max(lags, default=0))
    out["staleness/dropped_groups"] = float(dropped)
    return out
