"""Group-relative advantages and reward shaping (pure torch). Re-exported by ``troupe.learner.grpo``.

The algorithmic choices are stated once, in the docstring of ``troupe.learner.grpo``; this module
implements the reward -> advantage half of them:

* outcome advantages: ``compute_advantages`` dispatching to ``ADVANTAGE_ESTIMATORS``
  ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline");
* process-supervision advantages (DeepSeekMath section 4.1.3): ``process_advantages``;
* the informative-group rule of DAPO dynamic sampling (``informative``) and soft overlong punishment
  (``overlong_penalty``);
* reward statistics for metrics (``group_stats``) and ``ZERO_VARIANCE_MESSAGE``.

Batch convention: B samples in contiguous groups of ``group_size`` (rows k*G .. k*G+G-1 are the
G samples of prompt k). ``rewards`` is [B] float; NaN marks a sample that could not be scored: it
is left out of its group's statistics and gets advantage 0. Statistics are computed in float64.

Imports torch, math and typing only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from troupe.configs.algos import (
    AdvantageConfig,
    DrGRPOAdvantage,
    GRPOAdvantage,
    OnlineRFTAdvantage,
    OnPolicyDistillAdvantage,
    ProcessAdvantage,
    ReinforcePPBaselineAdvantage,
    RLOOAdvantage,
)
from troupe.learner import gae as _gae  # noqa: F401  (registers algo.advantage "gae": PPO with a critic)
from troupe.learner.registry import AdvantageInputs, advantage_fn, register_advantage

STD_MODES = ("unbiased", "population")

ZERO_VARIANCE_MESSAGE = (
    "Every group in this batch has zero reward variance: all samples of each prompt got the "
    "same reward (or fewer than two samples were scored), so every group-relative advantage is "
    "0, and the policy-gradient loss and its gradient are exactly 0 (only a KL term, if any, "
    "moves the weights). This is not a bug in the loss. To get a learning signal: raise the "
    "sampling temperature (rollout.temperature) so samples differ; use prompts of a difficulty "
    "the model sometimes but not always solves (all-correct groups mean the prompts are too "
    "easy, all-wrong groups that they are too hard); raise the group size G so that at least "
    "one sample differs; turn on DAPO dynamic sampling (algo.dynamic_sampling), which drops "
    "zero-variance groups and refills the batch; or use a graded reward instead of 0/1."
)


# ---------------------------------------------------------------------------------------------
# validation and grouping helpers
# ---------------------------------------------------------------------------------------------


def _check_group_size(n: int, group_size: int, what: str = "B") -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(
            f"{what}={n} samples is not divisible by group_size={group_size}: the batch must be "
            f"whole groups of G samples in contiguous rows"
        )


def _check_rewards(rewards: Tensor, group_size: int) -> None:
    if not isinstance(rewards, Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [B], got {shape}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor (NaN marks excluded samples), got {rewards.dtype}")
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain +-inf; use NaN to exclude a sample, finite values otherwise")
    _check_group_size(rewards.shape[0], group_size)


def _check_std(std: str) -> None:
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")


def _check_mask(response_mask: Tensor, B: int) -> None:
    if not isinstance(response_mask, Tensor) or response_mask.dim() != 2 or response_mask.shape[0] != B:
        shape = tuple(response_mask.shape) if isinstance(response_mask, Tensor) else type(response_mask).__name__
        raise ValueError(f"response_mask must be [B, T] with B={B}, got {shape}")


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return torch.float64 if rewards.dtype == torch.float64 else torch.float32


class _Groups:
    """Per-group statistics of a [B] reward vector viewed as [N, G] (float64, NaN-aware)."""

    def __init__(self, rewards: Tensor, group_size: int):
        r = rewards.detach().to(torch.float64).reshape(-1, group_size)
        self.valid = ~torch.isnan(r)  # [N, G] bool
        self.n = self.valid.sum(dim=1, keepdim=True).to(torch.float64)  # [N, 1] valid count
        self.r = torch.where(self.valid, r, torch.zeros_like(r))  # NaN -> 0
        self.mean = self.r.sum(dim=1, keepdim=True) / self.n.clamp(min=1.0)  # [N, 1]
        hi = torch.where(self.valid, r, torch.full_like(r, -math.inf)).amax(dim=1, keepdim=True)
        lo = torch.where(self.valid, r, torch.full_like(r, math.inf)).amin(dim=1, keepdim=True)
        # informative: >= 2 valid rewards that are not all equal. Other groups get exactly 0.
        self.informative = (self.n >= 2) & (hi > lo)  # [N, 1]
        centred = torch.where(self.valid & self.informative, self.r - self.mean, torch.zeros_like(r))
        self.centred = centred  # [N, G], exactly 0 for invalid samples and degenerate groups

    def std(self, mode: str) -> Tensor:
        """[N, 1] group std of the valid rewards: N-1 ("unbiased") or N ("population") divisor."""
        ddof = 1.0 if mode == "unbiased" else 0.0
        var = (self.centred**2).sum(dim=1, keepdim=True) / (self.n - ddof).clamp(min=1.0)
        return var.sqrt()


def _broadcast(adv_seq: Tensor, response_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B] per-sequence advantage -> [B, T] = adv * response_mask."""
    mask = response_mask.to(device=adv_seq.device, dtype=torch.float64)
    return (adv_seq.reshape(-1, 1) * mask).to(device=response_mask.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# advantage estimators: fn(AdvantageInputs, config) -> [B, T]   (troupe.learner.registry)
# ---------------------------------------------------------------------------------------------


def _outcome(inp: AdvantageInputs, std: str = "unbiased") -> _Groups:
    """Validated inputs of an outcome estimator, as per-group statistics."""
    _check_rewards(inp.rewards, inp.group_size)
    _check_mask(inp.response_mask, inp.rewards.shape[0])
    _check_std(std)
    return _Groups(inp.rewards, inp.group_size)


@register_advantage("grpo", GRPOAdvantage)
def grpo_advantages(inp: AdvantageInputs, cfg: GRPOAdvantage) -> Tensor:
    """GRPO outcome advantage (DeepSeekMath arXiv 2402.03300, section 4.1.2).

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), the same for every response token of sample i.
    ``cfg.std``: "unbiased" (divide by n-1, veRL/TRL) or "population" (n), n = valid samples of the
    group; ``cfg.eps`` is added to the std (veRL 1e-6, TRL 1e-4).

    Args:
        inp: rewards [B] (NaN = excluded: left out of the group mean/std, advantage 0), group_size G
            (B a multiple of G), response_mask [B, T].
    Returns:
        [B, T] float32 (float64 if rewards are float64): A_i * response_mask. Groups with fewer than
        2 valid rewards or with all valid rewards equal get exactly 0.
    Raises:
        ValueError: bad shapes/dtypes, B not divisible by G, inf rewards, unknown ``std``.
    """
    g = _outcome(inp, cfg.std)
    adv = g.centred / (g.std(cfg.std) + cfg.eps)
    adv = torch.where(g.informative, adv, torch.zeros_like(adv))
    return _broadcast(adv.reshape(-1), inp.response_mask, _out_dtype(inp.rewards))


@register_advantage("dr_grpo", DrGRPOAdvantage)
def dr_grpo_advantages(inp: AdvantageInputs, cfg: DrGRPOAdvantage) -> Tensor:
    """Dr.GRPO outcome advantage (arXiv 2503.20783): A_i = r_i - mean_g(r), no std division.

    Shapes, NaN handling and errors as ``grpo_advantages``.
    """
    g = _outcome(inp)
    return _broadcast(g.centred.reshape(-1), inp.response_mask, _out_dtype(inp.rewards))


@register_advantage("rloo", RLOOAdvantage)
def rloo_advantages(inp: AdvantageInputs, cfg: RLOOAdvantage) -> Tensor:
    """RLOO advantage (Ahmadian et al., arXiv 2402.14740): leave-one-out baseline.

    A_i = r_i - (1/(n-1)) sum_{j != i} r_j = n/(n-1) * (r_i - mean_g(r)), n = valid samples of the
    group (n < 2 -> 0). Shapes, NaN handling and errors as ``grpo_advantages``.
    """
    g = _outcome(inp)
    adv = g.centred * g.n / (g.n - 1.0).clamp(min=1.0)
    return _broadcast(adv.reshape(-1), inp.response_mask, _out_dtype(inp.rewards))


@register_advantage("reinforce_pp_baseline", ReinforcePPBaselineAdvantage)
def reinforce_pp_baseline_advantages(inp: AdvantageInputs, cfg: ReinforcePPBaselineAdvantage) -> Tensor:
    """REINFORCE++-baseline (arXiv 2501.03262; as in OpenRLHF ``reinforce_baseline`` / veRL).

    x_i = r_i - mean_g(r) (group baseline), broadcast to the sample's tokens, then whitened over the
    whole batch: A_{i,t} = (x_i - mu) / (sigma + eps), where mu and sigma are the mean and std of x
    over every response token (response_mask) of every valid sample in the batch -- token-weighted
    like veRL's ``masked_whiten`` and OpenRLHF's advantage normalisation. ``cfg.std`` picks the
    divisor of sigma^2 (token count - 1 or token count). The whitening shifts by mu, so samples of a
    constant group may get a small non-zero advantage (as in the peers). Call it on the whole step
    batch, not per micro-batch or per rank: mu and sigma are batch statistics.

    Returns [B, T] (0 on excluded samples and masked tokens). Errors as ``grpo_advantages``.
    """
    g = _outcome(inp, cfg.std)
    x = g.centred.reshape(-1)  # [B]
    valid = g.valid.reshape(-1)
    mask = inp.response_mask.detach().to(device=x.device, dtype=torch.float64)
    w = mask.sum(dim=1) * valid.to(torch.float64)  # [B] tokens each valid sample contributes
    total = w.sum()
    ddof = 1.0 if cfg.std == "unbiased" else 0.0
    if total - ddof <= 0:
        adv = torch.zeros_like(x)
    else:
        mu = (w * x).sum() / total
        sigma = ((w * (x - mu) ** 2).sum() / (total - ddof)).sqrt()
        adv = (x - mu) / (sigma + cfg.eps) if float(sigma) > 0 else torch.zeros_like(x)
        adv = torch.where(valid, adv, torch.zeros_like(adv))
    return _broadcast(adv, inp.response_mask, _out_dtype(inp.rewards))


@register_advantage("online_rft", OnlineRFTAdvantage)
def online_rft_advantages(inp: AdvantageInputs, cfg: OnlineRFTAdvantage) -> Tensor:
    """Online RFT's gradient coefficient (DeepSeekMath 5.2.1, Appendix A.1.3): A_i = 1 when r_i >= ``cfg.correct_at``,
    else 0, on every response token of sample i; excluded samples (NaN) get 0. No group statistics: a group whose
    samples are all correct trains on all of them. Shapes and errors as ``grpo_advantages``.
    """
    _outcome(inp)
    r = inp.rewards.detach().to(torch.float64)
    adv = torch.where(torch.isnan(r), torch.zeros_like(r), (r >= cfg.correct_at).to(torch.float64))
    return _broadcast(adv, inp.response_mask, _out_dtype(inp.rewards))


@register_advantage("distill", OnPolicyDistillAdvantage)
def on_policy_distill_advantages(inp: AdvantageInputs, cfg: OnPolicyDistillAdvantage) -> Tensor:
    """On-policy distillation's per-token coefficient: A_t = log pi_teacher(o_t) - log pi_student(o_t), given as
    ``inp.token_rewards`` (the learner ranks compute it from the teacher's and the old policy's log-probs), plus
    ``cfg.reward_weight`` times ``grpo_advantages`` of the rewards (unbiased std, eps 1e-6). No discounting: each
    token's coefficient is its own (GKD; Thinking Machines 2025). Excluded samples (NaN reward) and masked tokens
    get 0.

    Returns [B, T] in the mask's dtype. Raises ValueError without ``inp.token_rewards`` or on shapes.
    """
    if inp.token_rewards is None:
        raise ValueError("algo.advantage 'distill' needs the teacher-minus-student log-probs (AdvantageInputs."
                         "token_rewards), computed by the learner ranks")
    if inp.token_rewards.shape != inp.response_mask.shape:
        raise ValueError(f"token_rewards must be [B, T] = {tuple(inp.response_mask.shape)}, "
                         f"got {tuple(inp.token_rewards.shape)}")
    valid = (~torch.isnan(inp.rewards.detach())).to(inp.response_mask.dtype)[:, None]
    adv = inp.token_rewards.to(inp.response_mask.dtype) * inp.response_mask * valid
    if cfg.reward_weight:
        adv = adv + cfg.reward_weight * grpo_advantages(inp, GRPOAdvantage()).to(adv.dtype)
    return adv


def compute_advantages(inp: AdvantageInputs, cfg: AdvantageConfig) -> Tensor:
    """Advantages by the registered estimator ``cfg.name``: ``fn(inp, cfg)`` -> [B, T].

    Raises:
        ValueError: unknown estimator (the message lists the registered ones), or the estimator's
            own errors (B not divisible by G, bad shapes, inf rewards, ...).
    """
    return advantage_fn(cfg.name)(inp, cfg)


# ---------------------------------------------------------------------------------------------
# process supervision
# ---------------------------------------------------------------------------------------------


def _check_steps(step_rewards: list[list[float]], step_ends: list[list[int]], group_size: int, T: int) -> None:
    """Validate process inputs (lengths, ends in [0, T) and non-decreasing, no inf rewards)."""
    B = len(step_rewards)
    if len(step_ends) != B:
        raise ValueError(f"step_rewards has {B} samples but step_ends has {len(step_ends)}")
    _check_group_size(B, group_size)
    if not isinstance(T, int) or T < 0:
        raise ValueError(f"T must be an int >= 0, got {T!r}")
    for i, (rs, es) in enumerate(zip(step_rewards, step_ends)):
        if len(rs) != len(es):
            raise ValueError(f"sample {i}: {len(rs)} step rewards but {len(es)} step ends")
        prev = -1
        for r, e in zip(rs, es):
            if math.isinf(float(r)):
                raise ValueError(f"sample {i}: step reward {float(r)} is infinite; use NaN to exclude")
            if not isinstance(e, int) or isinstance(e, bool) or not (0 <= e < T):
                raise ValueError(f"sample {i}: step end {e!r} is not an int in [0, T={T})")
            if e < prev:
                raise ValueError(f"sample {i}: step ends must be non-decreasing, got {list(es)}")
            prev = e


@register_advantage("process", ProcessAdvantage)
def process_advantages(inp: AdvantageInputs, cfg: ProcessAdvantage) -> Tensor:
    """Process-supervision advantages (DeepSeekMath arXiv 2402.03300, section 4.1.3).

    For each group, all step rewards of all G outputs are normalised together:
    r~_{i,j} = (r_{i,j} - mean(R)) / (std(R) + eps), R = every valid step reward of the group.
    Token t of output i gets A_{i,t} = sum_{j : end(i,j) >= t} r~_{i,j} (the normalised rewards of
    the steps that end at or after t); tokens after the last step end get 0.

    Args:
        inp: ``step_rewards`` (B lists; NaN = excluded from the statistics, contributes 0; a sample
            may have no steps), ``step_ends`` (B lists of the same lengths, each end in [0, T),
            non-decreasing), ``group_size`` G, ``response_mask`` [B, T] (T and the output mask).
            ``rewards`` is not read.
        cfg: std ("unbiased" | "population") and eps as ``grpo_advantages``; a group with < 2 valid
            step rewards or all equal gets 0.
    Returns:
        [B, T] float32 on the mask's device, times the response mask.
    Raises:
        ValueError: missing step lists, length mismatches, end index outside [0, T) or decreasing,
        B not divisible by G, inf rewards, unknown std.
    """
    if inp.step_rewards is None or inp.step_ends is None:
        raise ValueError("advantage 'process' needs step rewards: no reward function of kind 'process' ran")
    _check_std(cfg.std)
    G, T = inp.group_size, inp.response_mask.shape[1]
    _check_steps(inp.step_rewards, inp.step_ends, G, T)
    ddof = 1 if cfg.std == "unbiased" else 0
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    for k in range(len(inp.step_rewards) // G):
        members = range(k * G, (k + 1) * G)
        group_vals = [float(r) for i in members for r in inp.step_rewards[i] if not math.isnan(float(r))]
        if not informative(group_vals):
            continue  # degenerate group (< 2 valid step rewards, or all equal): all-zero advantages
        n = len(group_vals)
        mean = math.fsum(group_vals) / n
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in group_vals) / (n - ddof))
        for i in members:
            for r, e in zip(inp.step_rewards[i], inp.step_ends[i]):
                if not math.isnan(float(r)):
                    rows.append(i)
                    cols.append(e)
                    vals.append((float(r) - mean) / (sd + cfg.eps))
    out = torch.zeros(len(inp.step_rewards), T, dtype=torch.float64)
    if vals:
        index = (torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long))
        out.index_put_(index, torch.tensor(vals, dtype=torch.float64), accumulate=True)
    # A_{i,t} = sum_{s >= t} out[i, s]: reverse cumulative sum over the token axis.
    adv = out.flip(-1).cumsum(-1).flip(-1).to(torch.float32)
    return adv.to(inp.response_mask.device) * inp.response_mask


def add_to_last_step(step_rewards: list[list[float]], bonus: Tensor) -> list[list[float]]:
    """Outcome-level shaping for process supervision: ``bonus[i]`` is added to sample i's last step.

    Used for terms that are per sequence (DAPO overlong penalty, KL in the reward) when
    advantages come from step rewards, so they reach every token of the sample as they would
    with an outcome reward. A sample with no steps is left as it is.

    Args:
        step_rewards: B lists of step rewards.
        bonus: [B] float (NaN leaves the last step NaN).
    Returns:
        New B lists (the input is not modified).
    Raises:
        ValueError: len(step_rewards) != B.
    """
    if bonus.dim() != 1 or bonus.shape[0] != len(step_rewards):
        raise ValueError(f"bonus must be [B={len(step_rewards)}], got {tuple(bonus.shape)}")
    return [rs[:-1] + [rs[-1] + float(x)] if rs else [] for rs, x in zip(step_rewards, bonus.tolist())]


def informative(values: Sequence[float]) -> bool:
    """The "informative group" rule: at least 2 valid (non-NaN) values that are not all equal.

    ``values`` are a group's outcome rewards, or all step rewards of its samples for step-reward
    estimators. A group that fails it gets zero advantage from grpo/dr_grpo/rloo/process (and a
    zero policy gradient), so DAPO dynamic sampling drops it and ``zero_variance_frac`` counts it.
    The vectorised ``_Groups.informative`` applies the same rule to [N, G] rewards.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return len(vals) >= 2 and max(vals) > min(vals)


# ---------------------------------------------------------------------------------------------
# DAPO dynamic sampling, overlong shaping, statistics
# ---------------------------------------------------------------------------------------------


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float) -> Tensor:
    """DAPO soft overlong punishment (arXiv 2503.14476, eq. 13), scaled by ``penalty``.

    R(L) = 0                                     if L <= max_len - buffer
         = (max_len - buffer - L) / buffer * penalty   if max_len - buffer < L <= max_len
         = -penalty                              if L > max_len
    A response truncated at max_len gets -penalty. buffer = 0 turns the ramp off (only L > max_len
    is punished). Added to the task reward before advantages are computed.

    Args:
        lengths: [B] response lengths in tokens (int or float).
        max_len: L_max (rollout max_new_tokens), >= 1.
        buffer: L_cache, 0 <= buffer <= max_len.
        penalty: maximum penalty, >= 0.
    Returns:
        [B] float32 (<= 0).
    Raises:
        ValueError: max_len < 1, buffer outside [0, max_len], penalty < 0, lengths not 1-D.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not (0 <= buffer <= max_len):
        raise ValueError(f"buffer must be in [0, max_len={max_len}], got {buffer}")
    if not (penalty >= 0.0):
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    if not isinstance(lengths, Tensor) or lengths.dim() != 1:
        raise ValueError("lengths must be a 1-D tensor [B]")
    L = lengths.to(torch.float64)
    start = float(max_len - buffer)
    ramp = (start - L) / max(buffer, 1) * penalty
    out = torch.where(L <= start, torch.zeros_like(L), ramp)
    out = torch.where(L > max_len, torch.full_like(L, -float(penalty)), out)
    return out.to(torch.float32)


def group_stats(rewards: Tensor, group_size: int) -> dict[str, float]:
    """Reward statistics for metrics.

    Args:
        rewards: [B] float, contiguous groups of G, NaN = excluded.
        group_size: G.
    Returns:
        {"zero_variance_frac": fraction of groups whose valid rewards are all equal (groups with
         fewer than 2 valid rewards count as zero-variance: their advantages are 0),
         "reward_mean": mean of valid rewards, "reward_std": population std of valid rewards
         (both 0.0 when nothing is valid), "valid_frac": fraction of samples with a reward}.
    Raises:
        ValueError: bad shape, B not divisible by G, inf rewards.
    """
    _check_rewards(rewards, group_size)
    g = _Groups(rewards, group_size)
    num_groups = g.informative.shape[0]
    v = rewards.detach().to(torch.float64)
    v = v[~torch.isnan(v)]
    return {
        "zero_variance_frac": float((~g.informative).sum()) / num_groups if num_groups else 0.0,
        "reward_mean": float(v.mean()) if v.numel() else 0.0,
        "reward_std": float(v.std(correction=0)) if v.numel() else 0.0,
        "valid_frac": float(v.numel()) / rewards.shape[0] if rewards.shape[0] else 0.0,
    }
