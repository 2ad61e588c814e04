"""Sample a saved policy with the engines and score the samples with a run's reward lanes, without a learner.

Shared by ``troupe rm pairs`` (``troupe.cluster.rm_pairs``) and the rejection-sampling stage
(``troupe.cluster.rejection``):

* :func:`policy_prompts`: the prompts of some data rows exactly as a run builds them
  (``troupe.rollout.prompts.build_prompts`` with the run's ``data`` settings and the policy's
  tokenizer; prompts longer than ``data.max_prompt_tokens`` dropped and counted);
* :func:`policy_sampling`: the run's ``rollout`` sampling settings with another ``n`` / temperature;
* :class:`PolicySampler`: the reward lanes (``troupe.reward.router.RewardRouter(cfg.reward)``, as in a
  run) and the engines (``troupe.cluster.runtime.start_engines``: a placement group of engine bundles,
  dead engines replaced as in a run), sampling prompts in chunks of ``rollout.prompts_per_step`` with
  the seeds ``sampling_seeds(cfg.seed, 0, positions)``: the i-th prompt's samples depend only on the
  seed, i and the weights, so the same call gives the same samples whatever the chunking.

Ray is imported only when a sampler starts; the caller owns Ray itself (init and shutdown).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from troupe.configs.schema import RunConfig
from troupe.core.types import Group, Prompt, Sampling

__all__ = ["PolicySampler", "policy_prompts", "policy_sampling"]


def policy_prompts(cfg: RunConfig, model: str, rows: list[dict], what: str = "model") -> tuple[list[Prompt], int]:
    """(prompts of ``rows`` built as a run builds them with ``model``'s tokenizer, prompts dropped for length).

    Raises:
        ValueError: the tokenizer cannot be loaded (names ``what`` and the folder), or no prompt fits
            ``data.max_prompt_tokens``.
    """
    from transformers import AutoTokenizer

    from troupe.rollout.prompts import build_prompts

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ...
        raise ValueError(f"{what} {model}: cannot load its tokenizer: {type(e).__name__}: {e}") from None
    d = cfg.data
    prompts, dropped = build_prompts(rows, tok, template=d.template, prompt_format=d.prompt_format,
                                     system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens)
    if not prompts:
        raise ValueError(f"none of the {len(rows)} prompts fits data.max_prompt_tokens = {d.max_prompt_tokens}")
    return prompts, dropped


def policy_sampling(cfg: RunConfig, n: int, temperature: Optional[float] = None) -> Sampling:
    """``n`` samples per prompt with ``rollout``'s max_new_tokens and top_p, at ``temperature``
    (None: ``rollout.temperature``)."""
    ro = cfg.rollout
    return Sampling(n=n, max_new_tokens=ro.max_new_tokens, top_p=ro.top_p,
                    temperature=ro.temperature if temperature is None else temperature)


class PolicySampler:
    """A saved policy's engines and a run's reward lanes (module docstring); Ray must be initialized.

    Usage::

        sampler = PolicySampler(cfg, model_dir)
        try:
            sampler.start_rewards()          # ValueError: a bad reward spec (seconds, before the engines)
            sampler.start_engines(log)       # TimeoutError / ActorFailed / RemoteTimeout
            for positions, groups in sampler.chunks(prompts, policy_sampling(cfg, n)):
                ...                          # scored groups, in prompt order
        finally:
            sampler.stop()                   # engines, placement group, reward lanes
    """

    def __init__(self, cfg: RunConfig, model: str) -> None:
        self.cfg, self.model = cfg, model
        self.engines: Any = None
        self.pg: Any = None
        self.rewards: Any = None

    def start_rewards(self) -> None:
        """Start the reward lanes (``RewardRouter(cfg.reward)``); ValueError on a bad reward spec."""
        from troupe.reward.router import RewardRouter

        self.rewards = RewardRouter(self.cfg.reward, ready_timeout_s=self.cfg.cluster.rpc_timeout_s)

    def start_engines(self, log: Callable[[str], None] = print) -> None:
        """Start the engines on ``model`` (``start_engines``; ``log`` gets restart lines); raises its errors."""
        from troupe.cluster.runtime import start_engines

        self.engines, self.pg = start_engines(self.cfg, self.model, log=log)

    def chunks(self, prompts: list[Prompt], sampling: Sampling) -> Iterator[tuple[list[int], list[Group]]]:
        """(positions, scored groups) per chunk of ``rollout.prompts_per_step`` prompts, in prompt order.

        Position i (the prompt's index in ``prompts``) seeds its samples: ``sampling_seeds(cfg.seed, 0, [i])``.
        Raises the engine group's errors (``ActorFailed``, ``RemoteTimeout``, RuntimeError after more than
        ``cluster.max_engine_failures`` engine deaths).
        """
        from troupe.rollout.prompts import sampling_seeds

        if self.engines is None:
            raise RuntimeError("PolicySampler.chunks: call start_engines() first")
        step = self.cfg.rollout.prompts_per_step
        for start in range(0, len(prompts), step):
            chunk = prompts[start:start + step]
            positions = list(range(start, start + len(chunk)))
            groups, _ = self.engines.generate(chunk, sampling, self.rewards,
                                              seeds=sampling_seeds(self.cfg.seed, 0, positions))
            yield positions, groups

    def stop(self) -> None:
        """Stop the engines, remove the placement group and stop the reward lanes (best effort, idempotent)."""
        from ray.util.placement_group import remove_placement_group

        engines, pg, rewards = self.engines, self.pg, self.rewards
        self.engines = self.pg = self.rewards = None
        for stop in (engines.shutdown if engines is not None else None,
                     (lambda: remove_placement_group(pg)) if pg is not None else None,
                     rewards.shutdown if rewards is not None else None):
            if stop is not None:
                try:
                    stop()
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
