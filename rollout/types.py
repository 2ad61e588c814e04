"""Typed data that crosses actor boundaries: prompts, samples, scored groups.

Plain dataclasses of Python lists (cheap to pickle through Ray, no torch). The learner turns
scored groups into a ``troupe.learner.batch.TrainBatch`` of padded tensors. This module must
not import torch, ray, vllm or deepspeed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Prompt:
    """One prompt row of a data set.

    Attributes:
        uid: stable index of the row in its data set.
        text: the prompt as given to the engine (template already applied).
        token_ids: ``text`` tokenized, [P] ints.
        question: the raw question (what reward functions see as ``prompts``).
        answer: the reference answer (a string; what accuracy rewards compare against).
        columns: every other column of the row, passed to reward functions as keyword arguments.
    """

    uid: int
    text: str
    token_ids: list[int]
    question: str
    answer: str
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class Sample:
    """One sampled response to a prompt.

    Attributes:
        response_ids: [R] generated token ids (R <= rollout.max_new_tokens), EOS included if emitted.
        sampling_logprobs: [R] log pi_engine(token | prefix) in nats, as the engine sampled them.
        text: decoded response.
        truncated: True if the response hit max_new_tokens without EOS.
        policy_version: the weight version the engine held when sampling.
        step_ends: [S] index of the last response token of each reasoning step
            (``troupe.rollout.steps``), filled by the engine only when a step delimiter is set
            (process supervision); empty otherwise and for an empty response.
    """

    response_ids: list[int]
    sampling_logprobs: list[float]
    text: str
    truncated: bool
    policy_version: int
    step_ends: list[int] = field(default_factory=list)


@dataclass
class Group:
    """G samples of one prompt, and their scores once the reward workers have seen them.

    ``rewards[i]`` is the combined weighted reward of sample i, or None when it could not be
    scored and the failure policy is "exclude". ``reward_parts[name][i]`` keeps each reward
    function's own score (None on failure) for metrics; for a process reward function that is
    the mean of its step scores.

    ``step_rewards[i]`` (process supervision only, else empty) is sample i's combined reward per
    reasoning step, [S_i] floats (NaN = a step left out of the statistics), aligned with
    ``samples[i].step_ends``, or None when the sample is excluded. Outcome reward functions'
    weighted scores are added to the last step.
    """

    prompt: Prompt
    samples: list[Sample]
    rewards: list[Optional[float]] = field(default_factory=list)
    reward_parts: dict[str, list[Optional[float]]] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    step_rewards: list[Optional[list[float]]] = field(default_factory=list)

    @property
    def size(self) -> int:
        """G, the number of samples."""
        return len(self.samples)
