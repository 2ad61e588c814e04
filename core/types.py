"""The records every part of troupe exchanges: prompts, samples, scored groups, the training batch.

This is the one neutral module: rollout/, reward/, learner/ and cluster/ import it, and it
imports nothing of troupe's (and neither torch, ray, vllm nor deepspeed at import time;
``TrainBatch`` holds torch tensors but only ``select`` touches torch, lazily).

    Prompt  --engines-->  Group(prompt, [Sample] * G)  --reward workers-->  Group with rewards
            --troupe.learner.batch.collate_groups-->  TrainBatch  --> learner ranks

``Prompt``/``Sample``/``Group`` are plain dataclasses of Python lists (cheap to pickle through
Ray). ``TrainBatch`` is the padded-tensor form the learner trains on (SkyRL-style typed batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # pragma: no cover
    import torch


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


@dataclass(frozen=True)
class Sampling:
    """How engines sample: vLLM ``SamplingParams`` settings troupe uses.

    Attributes:
        n: samples per prompt (G; 1 for greedy evaluation).
        max_new_tokens: response cap in tokens.
        temperature: 0 = greedy.
        top_p: nucleus mass.
        seed: sampling seed, or None (the engine's own RNG stream).
        step_delimiter: process supervision: engines mark each sample's step ends at this delimiter
            (``troupe.core.steps``); None otherwise.
    """

    n: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    step_delimiter: Optional[str] = None

    def with_(self, **kw: Any) -> "Sampling":
        """A copy with some fields replaced."""
        return replace(self, **kw)


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
            (``troupe.core.steps``), filled by the engine only when a step delimiter is set
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


@dataclass
class TrainBatch:
    """A GRPO training batch: scored groups as padded tensors, one row per sample.

    Rows k*G .. k*G+G-1 are group k. ``input_ids = [left-padded prompt (P) | right-padded
    response (T)]``, so the response always starts at column P and every per-token tensor is
    [B, T] over the response only; ``logits[:, P-1 : P+T-1]`` predict the response tokens.
    Built by ``troupe.learner.batch.collate_groups``.

    Attributes:
        input_ids: [B, P+T] long. Prompt left-padded to P, response right-padded to T.
        attention_mask: [B, P+T] long. 1 on real prompt and response tokens.
        response_mask: [B, T] float. 1 on response tokens that count in the loss (0 on padding,
            on excluded samples and, with ``mask_truncated``, on truncated responses).
        sampling_logprobs: [B, T] float. Engine log-probabilities of the sampled tokens (nats).
        rewards: [B] float. Combined reward per sample; NaN = excluded (no score).
        truncated: [B] bool. Response hit max_new_tokens without EOS.
        response_lengths: [B] long. Response tokens per sample (masked or not), for length shaping.
        prompt_len: P, the padded prompt width.
        step_rewards: process supervision only (else None): B lists, ``step_rewards[i][j]`` = reward
            of reasoning step j of sample i (NaN = unscored step); [] for an excluded or empty
            sample.
        step_ends: process supervision only: B lists of the same lengths, ``step_ends[i][j]`` in
            [0, T) = index of the last response token of step j, non-decreasing.
        values: PPO with a critic only (else None): [B, T] float32, the critic's value of each response
            token's state (the prefix before it) at sampling time, 0 where the response mask is 0.
    """

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    response_mask: "torch.Tensor"
    sampling_logprobs: "torch.Tensor"
    rewards: "torch.Tensor"
    truncated: "torch.Tensor"
    response_lengths: "torch.Tensor"
    prompt_len: int
    step_rewards: Optional[list[list[float]]] = None
    step_ends: Optional[list[list[int]]] = None
    values: Optional["torch.Tensor"] = None

    @property
    def size(self) -> int:
        """B, the number of samples."""
        return self.input_ids.shape[0]

    @property
    def response_len(self) -> int:
        """T, the padded response width."""
        return self.response_mask.shape[1]

    def select(self, rows: "slice | torch.Tensor") -> "TrainBatch":
        """Rows of the batch (a micro-batch or a rank's shard); ``prompt_len`` kept.

        Args:
            rows: a slice, a [B] bool mask or a [K] index tensor.
        """
        import torch

        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[rows]
            elif isinstance(v, list):
                v = v[rows] if isinstance(rows, slice) else [v[i] for i in torch.arange(len(v))[rows].tolist()]
            out[f.name] = v
        return TrainBatch(**out)

    def with_(self, **kw: Any) -> "TrainBatch":
        """A copy with some fields replaced."""
        return replace(self, **kw)
