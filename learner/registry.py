"""The two algorithm registries: advantage estimators and policy losses (veRL core_algos style).

A variant is one pure function plus one config class, registered together under the name a run
config uses (``algo.advantage`` / ``algo.policy_loss``)::

    class MyLoss(PolicyLossConfig):                  # troupe.configs.algos
        name: Literal["my_loss"] = "my_loss"
        scale: float = 1.0

    @register_policy_loss("my_loss", MyLoss)
    def my_loss(inp: LossInputs, cfg: MyLoss) -> tuple[Tensor, dict[str, Tensor]]:
        return -cfg.scale * inp.advantages * torch.exp(inp.logp - inp.old_logp), {}

Signatures (one for all variants of a kind):

* advantage estimator: ``fn(inp: AdvantageInputs, cfg) -> Tensor [B, T]`` (0 where the response
  mask is 0);
* policy loss: ``fn(inp: LossInputs, cfg) -> (per-token loss [B, T], metrics)``, a loss to
  minimise per token; masked positions of the inputs are already 0 and their loss is ignored.
  What every loss shares is done around it by ``troupe.learner.losses.policy_loss``: the
  truncated importance weight, the KL term to the reference, and the split-invariant
  aggregation.

The config class is registered in ``troupe.configs.algos`` (pydantic only) so that configs
validate without torch. A config class pickled into a Ray actor imports its defining module
there, which registers the function too: define a new variant's function and config class in
one importable module. Imports torch (for types) and troupe.configs.algos only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import Tensor

from troupe.configs.algos import (
    ADVANTAGE_CONFIGS,
    POLICY_LOSS_CONFIGS,
    AdvantageConfig,
    ConfigRegistry,
    PolicyLossConfig,
)


@dataclass
class AdvantageInputs:
    """What an advantage estimator sees: one whole step batch (never a shard: statistics are per
    group and, for some estimators, per batch).

    Attributes:
        rewards: [B] float, shaped outcome rewards; NaN = excluded sample. Rows k*G..k*G+G-1 are group k.
        response_mask: [B, T] float, 1 on response tokens that count.
        group_size: G.
        step_rewards: B lists of per-step rewards (step-reward estimators only; per-sequence shaping
            already added to the last step), else None.
        step_ends: B lists of the last response token index of each step, else None.
        values: [B, T] float, a learned critic's values of the response tokens at sampling time
            (critic estimators, ``uses_critic``), else None.
        token_rewards: [B, T] float, per-token reward terms added on every response token (with the
            KL in the reward and a critic: -kl_coef * KL_t), else None.
    """

    rewards: Tensor
    response_mask: Tensor
    group_size: int
    step_rewards: Optional[list[list[float]]] = None
    step_ends: Optional[list[list[int]]] = None
    values: Optional[Tensor] = None
    token_rewards: Optional[Tensor] = None


@dataclass
class LossInputs:
    """What a policy loss sees: one micro-batch, every tensor [B, T] over response tokens.

    Attributes:
        logp: log pi_theta of the sampled tokens (requires grad), float32 or float64.
        old_logp: learner log-probs before the first update of this step (detached).
        advantages: per-token advantages (detached).
        response_mask: 1 on tokens that count (same dtype as logp).
        sampling_logp: the engines' log-probs of the same tokens, or None.
        ref_logp: the reference model's log-probs, or None (kl_coef = 0).
    """

    logp: Tensor
    old_logp: Tensor
    advantages: Tensor
    response_mask: Tensor
    sampling_logp: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None


AdvantageFn = Callable[[AdvantageInputs, AdvantageConfig], Tensor]
PolicyLossFn = Callable[[LossInputs, PolicyLossConfig], "tuple[Tensor, dict[str, Tensor]]"]


class _Registry:
    """Name -> function of one kind of variant; registering also registers the config class."""

    def __init__(self, configs: ConfigRegistry) -> None:
        self.configs = configs
        self._fns: dict[str, Callable] = {}

    def register(self, name: str, config: type) -> Callable[[Callable], Callable]:
        """Decorator: register the decorated function and ``config`` under ``name``.

        Raises:
            TypeError / ValueError: from ``troupe.configs.algos`` when the config class does not fit.
        """
        self.configs.register(name, config)

        def deco(fn: Callable) -> Callable:
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable:
        """The function registered as ``name``; ValueError listing the registered ones if unknown."""
        if name not in self._fns:
            raise ValueError(f"unknown {self.configs.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._fns[name]

    def names(self) -> list[str]:
        """Names with a registered function, sorted."""
        return sorted(self._fns)


_ADVANTAGES = _Registry(ADVANTAGE_CONFIGS)
_LOSSES = _Registry(POLICY_LOSS_CONFIGS)


def register_advantage(name: str, config: type[AdvantageConfig]) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an advantage estimator ``fn(AdvantageInputs, cfg) -> [B, T]`` and its config class."""
    return _ADVANTAGES.register(name, config)


def register_policy_loss(name: str, config: type[PolicyLossConfig]) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss ``fn(LossInputs, cfg) -> (loss [B, T], metrics)`` and its config class."""
    return _LOSSES.register(name, config)


def advantage_fn(name: str) -> AdvantageFn:
    """The registered estimator ``name``; ValueError listing the registered ones if unknown."""
    return _ADVANTAGES.get(name)


def policy_loss_fn(name: str) -> PolicyLossFn:
    """The registered policy loss ``name``; ValueError listing the registered ones if unknown."""
    return _LOSSES.get(name)


def registered() -> dict[str, list[str]]:
    """{"advantage": [names], "policy_loss": [names]} with a function registered."""
    return {"advantage": _ADVANTAGES.names(), "policy_loss": _LOSSES.names()}
