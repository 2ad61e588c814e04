"""Typed configs of the advantage estimators and policy losses, one class per variant.

``algo.advantage`` and ``algo.policy_loss`` in a run config name a variant and carry that
variant's own settings (prime-rl style: one pydantic class per algorithm variant, with bounds
and docs)::

    algo:
      advantage: grpo                                  # a name alone takes the defaults
      policy_loss: {name: ppo_clip, clip_high: 0.28}   # or a mapping with the name and settings

The maths for each name is registered next to it in ``troupe.learner.registry`` (one
function per variant, veRL core_algos style). This module imports pydantic only, so a config can
be validated without torch; a new variant registers its config class here through
``troupe.learner.registry.register_advantage`` / ``register_policy_loss`` (one function plus one
config class, nothing else; see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(description="The registered name of this variant.")


class AdvantageConfig(_Variant):
    """Base class of an advantage estimator's config.

    ``uses_step_rewards`` (class attribute) is True for estimators that read per-step rewards
    (process supervision): the engines then mark step ends, the reward workers score steps, and
    per-sequence reward shaping is added to the last step. ``uses_critic`` is True for estimators
    that read a learned critic's values (``AdvantageInputs.values``): the run then needs a ``critic``
    section, which starts the critic's ranks. ``uses_teacher`` is True for estimators that read a
    teacher model's log-probs (the config's ``teacher`` field): the learner ranks then load it, frozen.
    """

    uses_step_rewards: ClassVar[bool] = False
    uses_critic: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False


class PolicyLossConfig(_Variant):
    """Base class of a policy loss's config."""


class _GroupStd(AdvantageConfig):
    std: Literal["unbiased", "population"] = Field(
        "unbiased", description="Group std divisor: 'unbiased' (N-1, veRL/TRL) or 'population' (N).")
    eps: float = Field(1e-6, gt=0.0, le=1.0, description="Added to the std (veRL 1e-6, TRL 1e-4).")


class GRPOAdvantage(_GroupStd):
    """GRPO (DeepSeekMath arXiv 2402.03300, 4.1.2): A_i = (r_i - mean_g r) / (std_g r + eps)."""

    name: Literal["grpo"] = "grpo"


class DrGRPOAdvantage(AdvantageConfig):
    """Dr.GRPO (arXiv 2503.20783): A_i = r_i - mean_g r, no std division."""

    name: Literal["dr_grpo"] = "dr_grpo"


class RLOOAdvantage(AdvantageConfig):
    """RLOO (arXiv 2402.14740): leave-one-out baseline, A_i = n/(n-1) (r_i - mean_g r)."""

    name: Literal["rloo"] = "rloo"


class ReinforcePPBaselineAdvantage(_GroupStd):
    """REINFORCE++-baseline (arXiv 2501.03262): group mean removed, then whitened over the batch's tokens."""

    name: Literal["reinforce_pp_baseline"] = "reinforce_pp_baseline"


class ProcessAdvantage(_GroupStd):
    """Process supervision (DeepSeekMath 4.1.3): step rewards normalised over the group; a token gets
    the sum of the normalised rewards of the steps ending at or after it. Needs a reward function of
    kind 'process'."""

    name: Literal["process"] = "process"
    uses_step_rewards: ClassVar[bool] = True


class OnlineRFTAdvantage(AdvantageConfig):
    """Online rejection-sampling fine-tuning (DeepSeekMath 5.2.1 and Appendix A.1.3): samples of the live policy,
    gradient coefficient 1 for a sample whose reward reaches ``correct_at`` and 0 otherwise (no baseline, no
    normalisation). With ``algo.loss_agg: seq_mean_token_mean`` the gradient is the paper's
    1/|o| sum_t GC * grad log pi."""

    name: Literal["online_rft"] = "online_rft"
    correct_at: float = Field(1.0, description="A sample counts as correct (coefficient 1) when its combined reward "
                                               "is at least this.")


class OnPolicyDistillAdvantage(AdvantageConfig):
    """On-policy distillation (GKD, Agarwal et al. 2024, arXiv 2306.13649, with lambda = 1; Thinking Machines'
    "On-policy distillation", 2025): the student's own samples, and on every sampled token the coefficient
    log pi_teacher(o_t) - log pi_student(o_t), the negative per-token reverse KL (DeepSeekMath 5.2.1's gradient
    coefficient, per token, from a teacher instead of a reward), plus ``reward_weight`` times the GRPO advantage
    of the task reward. The teacher is frozen in every learner rank, as the reference is (sharded under ZeRO-3)."""

    name: Literal["distill"] = "distill"
    uses_teacher: ClassVar[bool] = True
    teacher: str = Field(min_length=1, description="The teacher: an HF causal-LM folder or hub id with the policy's "
                                                   "vocabulary (its log-probs are read at the policy's token ids).")
    reward_weight: float = Field(0.0, ge=0.0, le=1000.0, description="Mix in the task reward: + reward_weight * "
                                                                     "the GRPO advantage (0: distillation alone).")


class GAEAdvantage(AdvantageConfig):
    """PPO's generalized advantage estimation (Schulman et al. 2016, eq. 16) with a learned critic (the run's
    ``critic`` section; DeepSeekMath 4.1.1, the baseline GRPO replaces): per-token rewards are the sequence
    reward on the last response token and, with ``algo.kl_in: reward``, -kl_coef * KL_t on every response token
    (InstructGPT; OpenRLHF, veRL); returns = advantages + values are the critic's targets.
    gamma = lam = 1: Monte-Carlo returns minus the value baseline."""

    name: Literal["gae"] = "gae"
    uses_critic: ClassVar[bool] = True
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount per response token.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda (1: Monte-Carlo returns, 0: one-step TD).")
    whiten: bool = Field(True, description="Normalise the advantages over the batch's response tokens (mean 0, "
                                           "std 1) before the policy loss, as OpenRLHF and veRL do for PPO; the "
                                           "critic's returns are computed before it.")


class PPOClipLoss(PolicyLossConfig):
    """PPO clipped surrogate with a per-token ratio (GRPO, DeepSeekMath eq. 3), DAPO clip-higher,
    optional dual clip (arXiv 1912.09729)."""

    name: Literal["ppo_clip"] = "ppo_clip"
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="eps_low: ratio clipped below at 1 - clip_low.")
    clip_high: float = Field(0.28, ge=0.0, le=10.0, description="eps_high (DAPO clip-higher): ratio clipped at 1 + clip_high.")
    dual_clip: Optional[float] = Field(None, gt=1.0, description="Dual-clip bound c for negative advantages (None: off).")


class GSPOLoss(PolicyLossConfig):
    """GSPO (arXiv 2507.18071): the length-normalised sequence ratio, clipped; defaults are the
    paper's clip ranges (3e-4 / 4e-4)."""

    name: Literal["gspo"] = "gspo"
    clip_low: float = Field(3e-4, ge=0.0, le=1.0, description="Sequence ratio clipped below at 1 - clip_low.")
    clip_high: float = Field(4e-4, ge=0.0, le=10.0, description="Sequence ratio clipped above at 1 + clip_high.")


class ConfigRegistry:
    """Name -> config class of one kind of variant (advantage estimators or policy losses)."""

    def __init__(self, kind: str, base: type[_Variant]) -> None:
        self.kind, self.base = kind, base
        self._classes: dict[str, type[_Variant]] = {}

    def register(self, name: str, cls: type[_Variant]) -> None:
        """Register ``cls`` as the config of variant ``name``.

        Raises:
            TypeError: ``cls`` is not a subclass of the kind's base config class.
            ValueError: ``name`` is taken by another class, or ``cls.name`` defaults to another name.
        """
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{self.kind} {name!r}: config class must subclass {self.base.__name__}, got {cls!r}")
        default = cls.model_fields["name"].default
        if default != name:
            raise ValueError(f"{self.kind} {name!r}: {cls.__name__}.name must default to {name!r} (got {default!r})")
        if self._classes.get(name, cls) is not cls:
            raise ValueError(f"{self.kind} {name!r} is already registered with {self._classes[name].__name__}")
        self._classes[name] = cls

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._classes)

    def config_class(self, name: str) -> type[_Variant]:
        """The config class of ``name``; ValueError listing the registered names if unknown."""
        if name not in self._classes:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._classes[name]

    def parse(self, value: Any, default: str) -> _Variant:
        """A config instance from a name, a mapping with ``name`` (``default`` when absent), or an instance."""
        if isinstance(value, self.base):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError(f"expected a {self.kind} name or a mapping with 'name', got {value!r}")
        value = {"name": default, **value}
        try:
            return self.config_class(value["name"]).model_validate(value)
        except ValidationError as e:  # re-raised as ValueError so pydantic keeps the outer key path
            raise ValueError("; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors())) from None


ADVANTAGE_CONFIGS = ConfigRegistry("advantage estimator", AdvantageConfig)
"""Advantage estimator name -> config class (``troupe.learner.registry`` registers the maths)."""
POLICY_LOSS_CONFIGS = ConfigRegistry("policy loss", PolicyLossConfig)
"""Policy loss name -> config class."""

for _cls in (GRPOAdvantage, DrGRPOAdvantage, RLOOAdvantage, ReinforcePPBaselineAdvantage, ProcessAdvantage,
             OnlineRFTAdvantage, OnPolicyDistillAdvantage, GAEAdvantage):
    ADVANTAGE_CONFIGS.register(_cls.model_fields["name"].default, _cls)
for _cls in (PPOClipLoss, GSPOLoss):
    POLICY_LOSS_CONFIGS.register(_cls.model_fields["name"].default, _cls)
