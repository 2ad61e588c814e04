"""The training batch: scored groups collated into padded tensors.

Layout (one row per sample, groups contiguous: rows k*G .. k*G+G-1 are group k):

    input_ids = [ left-padded prompt (P) | right-padded response (T) ]

so the response always starts at column P and every per-token tensor is [B, T] over the
response only; ``logits[:, P-1 : P+T-1]`` predict the response tokens. Imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from troupe.rollout.types import Group


@dataclass
class TrainBatch:
    """A GRPO training batch (SkyRL-style typed structure; every tensor states its shape).

    Attributes:
        input_ids: [B, P+T] long. Prompt left-padded to P, response right-padded to T.
        attention_mask: [B, P+T] long. 1 on real prompt and response tokens.
        response_mask: [B, T] float. 1 on response tokens that count in the loss (0 on padding,
            on excluded samples and, with ``mask_truncated``, on truncated responses).
        sampling_logprobs: [B, T] float. Engine log-probabilities of the sampled tokens (nats).
        rewards: [B] float. Combined reward per sample; NaN = excluded (no score).
        truncated: [B] bool. Response hit max_new_tokens without EOS.
        advantages: [B, T] float, filled by the learner (0 where response_mask is 0).
        old_logprobs: [B, T] float, learner log-probs before the first update of this batch.
        ref_logprobs: [B, T] float or None, reference-model log-probs (None when kl_coef = 0).
        prompt_len: P, the padded prompt width.
        step_rewards: process supervision only (else None): B lists, step_rewards[i][j] = reward
            of reasoning step j of sample i (NaN = unscored step); [] for an excluded or empty
            sample.
        step_ends: process supervision only: B lists of the same lengths, step_ends[i][j] in
            [0, T) = index of the last response token of step j, non-decreasing.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    sampling_logprobs: torch.Tensor
    rewards: torch.Tensor
    truncated: torch.Tensor
    prompt_len: int
    advantages: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    step_rewards: Optional[list[list[float]]] = None
    step_ends: Optional[list[list[int]]] = None

    @property
    def size(self) -> int:
        """B, the number of samples."""
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        """T, the padded response width."""
        return self.response_mask.shape[1]

    def select(self, rows: slice | torch.Tensor) -> "TrainBatch":
        """Rows of the batch (a micro-batch or a rank's shard); scalar fields kept."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[rows]
            elif isinstance(v, list):
                v = v[rows] if isinstance(rows, slice) else [v[i] for i in torch.arange(len(v))[rows].tolist()]
            out[f.name] = v
        return TrainBatch(**out)

    def with_(self, **kw) -> "TrainBatch":
        """A copy with some fields replaced."""
        return replace(self, **kw)


def collate_groups(groups: list[Group], pad_id: int, *, mask_truncated: bool = False) -> TrainBatch:
    """Collate scored groups into a ``TrainBatch``.

    Args:
        groups: scored groups; ``group.rewards[i]`` None means excluded (mask 0, reward NaN).
            When the groups carry ``step_rewards`` (process supervision), the batch gets
            ``step_rewards``/``step_ends`` from them and ``sample.step_ends``.
        pad_id: token id used for padding (never attended to).
        mask_truncated: exclude truncated responses from the loss (DAPO overlong filtering);
            their rewards still count in their group's statistics.

    Raises:
        ValueError: if groups is empty, a sample has mismatched ids/logprobs lengths, or a
            sample's step rewards do not match its step ends (process supervision).
    """
    if not groups:
        raise ValueError("collate_groups: no groups")
    rows = [(g.prompt.token_ids, s, (g.rewards[i] if g.rewards else None)) for g in groups for i, s in enumerate(g.samples)]
    P = max(len(p) for p, _, _ in rows)
    T = max(1, max(len(s.response_ids) for _, s, _ in rows))
    B = len(rows)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    resp_mask = torch.zeros((B, T), dtype=torch.float32)
    samp_lp = torch.zeros((B, T), dtype=torch.float32)
    rewards = torch.full((B,), math.nan, dtype=torch.float32)
    truncated = torch.zeros((B,), dtype=torch.bool)
    for b, (p, s, r) in enumerate(rows):
        if len(s.response_ids) != len(s.sampling_logprobs):
            raise ValueError(f"collate_groups: sample {b} has {len(s.response_ids)} ids but {len(s.sampling_logprobs)} logprobs")
        n = len(s.response_ids)
        input_ids[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[b, P - len(p):P] = 1
        if n:
            input_ids[b, P:P + n] = torch.tensor(s.response_ids, dtype=torch.long)
            attn[b, P:P + n] = 1
            samp_lp[b, :n] = torch.tensor(s.sampling_logprobs, dtype=torch.float32)
        truncated[b] = s.truncated
        if r is not None and not math.isnan(r):
            rewards[b] = float(r)
            if not (mask_truncated and s.truncated):
                resp_mask[b, :n] = 1.0
    batch = TrainBatch(input_ids, attn, resp_mask, samp_lp, rewards, truncated, prompt_len=P)
    if any(g.step_rewards for g in groups):
        batch.step_rewards, batch.step_ends = _collate_steps(groups)
    return batch


def _collate_steps(groups: list[Group]) -> tuple[list[list[float]], list[list[int]]]:
    """Per-sample step rewards and step-end token indices, in batch row order."""
    step_rewards: list[list[float]] = []
    step_ends: list[list[int]] = []
    b = 0
    for g in groups:
        for i, s in enumerate(g.samples):
            sr = g.step_rewards[i] if i < len(g.step_rewards) else None
            if sr is None or not s.response_ids:
                step_rewards.append([])
                step_ends.append([])
            elif len(sr) != len(s.step_ends):
                raise ValueError(
                    f"collate_groups: sample {b} has {len(sr)} step rewards but {len(s.step_ends)} step ends "
                    "(engines and reward workers must cut steps with the same reward.step_delimiter)"
                )
            else:
                step_rewards.append([float(x) for x in sr])
                step_ends.append(list(s.step_ends))
            b += 1
    return step_rewards, step_ends


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the response tokens under ``logits``.

    Args:
        logits: [B, P+T, V] model output.
        input_ids: [B, P+T].
        prompt_len: P.
        temperature: logits are divided by it first, as the engine did when sampling.

    Returns:
        [B, T] float32 log pi(token_t | prefix) in nats.
    """
    T = input_ids.shape[1] - prompt_len
    lg = logits[:, prompt_len - 1: prompt_len - 1 + T].float()
    if temperature != 1.0:
        lg = lg / temperature
    tgt = input_ids[:, prompt_len:prompt_len + T]
    return torch.gather(lg.log_softmax(-1), 2, tgt.unsqueeze(-1)).squeeze(-1)
