"""The Bradley-Terry reward-model loss (pure maths; the model format is ``troupe.reward.model``).

``-log sigmoid(r_chosen - r_rejected - margin)`` averaged over pairs (Bradley & Terry 1952;
InstructGPT eq. 1; the optional margin term from Llama 2, sec. 3.2.2), computed as
``softplus(-(d - m))`` for stability.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["bradley_terry_loss"]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None,
                       *, reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry pairwise loss ``-log sigmoid(r_c - r_r - m)``.

    Args:
        chosen: [B] rewards of the preferred responses.
        rejected: [B] rewards of the dispreferred responses.
        margin: [B] optional per-pair margins (Llama 2 sec. 3.2.2); None = 0.
        reduction: ``"mean"`` (over the B pairs) or ``"sum"`` (the caller divides, e.g. by the
            pairs of a whole step across micro-batches and ranks).
    Returns:
        (loss scalar, metrics) with metrics ``accuracy`` (share of pairs with r_c > r_r) and
        ``margin`` (mean r_c - r_r), both over this call's pairs.
    Raises:
        ValueError: shapes differ or are not 1-D, or an unknown reduction.
    """
    if chosen.ndim != 1 or chosen.shape != rejected.shape or (margin is not None and margin.shape != chosen.shape):
        raise ValueError(f"bradley_terry_loss: chosen {tuple(chosen.shape)}, rejected {tuple(rejected.shape)}"
                         f"{'' if margin is None else f', margin {tuple(margin.shape)}'}: expected equal 1-D shapes")
    diff = chosen - rejected
    z = diff if margin is None else diff - margin.to(diff.dtype)
    per_pair = F.softplus(-z)  # = -log sigmoid(z)
    if reduction == "mean":
        loss = per_pair.mean()
    elif reduction == "sum":
        loss = per_pair.sum()
    else:
        raise ValueError(f"bradley_terry_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    d = diff.detach().float()
    return loss, {"accuracy": float((d > 0).float().mean()) if d.numel() else float("nan"),
                  "margin": float(d.mean()) if d.numel() else float("nan")}
