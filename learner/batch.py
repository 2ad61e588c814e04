"""Scored groups -> ``TrainBatch`` (padded tensors), and log-probs of tokens under logits.

The batch layout is documented on ``troupe.core.types.TrainBatch``. Imports torch only.
"""

from __future__ import annotations

import math
import torch

from troupe.core.types import Group, TrainBatch


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
    lengths = torch.tensor([len(s.response_ids) for _, s, _ in rows], dtype=torch.long)
    batch = TrainBatch(input_ids, attn, resp_mask, samp_lp, rewards, truncated, lengths, prompt_len=P)
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


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] in float32, nats.

    Args:
        logits: [..., V] (any leading shape).
        targets: [...] token ids, the same leading shape.
        temperature: logits are divided by it first, as the engine did when sampling.
    Returns:
        [...] float32.
    """
    lg = logits.float()
    if temperature != 1.0:
        lg = lg / temperature
    return torch.gather(lg.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the response tokens under ``logits``.

    Args:
        logits: [B, P+T, V] model output.
        input_ids: [B, P+T].
        prompt_len: P.
        temperature: as ``token_logprobs``.

    Returns:
        [B, T] float32 log pi(token_t | prefix) in nats.
    """
    T = input_ids.shape[1] - prompt_len
    return token_logprobs(logits[:, prompt_len - 1: prompt_len - 1 + T], input_ids[:, prompt_len:prompt_len + T], temperature)
