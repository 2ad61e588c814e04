"""Faults injected on purpose: a policy loss that is not finite (the NaN guard's test).

Imported by name inside learner ranks (its config class is pickled into them), so this folder must
be on the workers' PYTHONPATH (tests/conftest.py's ``ray_local`` does that; e2e tests set it).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from troupe.configs.algos import PolicyLossConfig
from troupe.learner import grpo


class NaNLoss(PolicyLossConfig):
    """REINFORCE whose per-token loss is NaN on every token (``poison`` > 0) or plain (0)."""

    name: Literal["nan_loss"] = "nan_loss"
    poison: float = Field(1.0, ge=0.0)


@grpo.register_policy_loss("nan_loss", NaNLoss)
def nan_loss(inp: grpo.LossInputs, cfg: NaNLoss):
    ratio = torch.exp(inp.logp - inp.old_logp)
    loss = -inp.advantages * ratio
    if cfg.poison:
        loss = loss + torch.full_like(loss, float("nan"))
    return loss, {}


def wait_until_dead(ray, call, timeout_s: float = 60.0) -> None:
    """Wait (at most ``timeout_s``) until ``call()``, a bound ``actor.method.remote``, raises RayActorError.

    ``ray.kill`` is asynchronous: a call made right after it can still be answered by the dying actor,
    so a test that expects the next call to find the actor dead (and replace it) waits here first.
    """
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(call(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.2)
