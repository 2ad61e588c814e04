"""Rejection-sampling filters (DeepSeek-R1's SFT-data stage) over a policy's own samples, pure Python.

DeepSeek-R1 (arXiv 2501.12948), section 2.3.3 "Rejection Sampling and Supervised Fine-Tuning":
from the reasoning-RL checkpoint, sample multiple responses per prompt, "retain only the correct
ones", and "filtered out chain-of-thought with mixed languages, long paragraphs, and code blocks";
about 600k reasoning samples, mixed with about 200k non-reasoning (general) samples, then two
epochs of SFT. ``troupe.cluster.rejection`` samples with the engines and scores with the run's
reward lanes; this module decides which samples are kept (``troupe.rollout.rejection`` reads SFT
files and mixes in the general rows). The choices:

* **A sample** is a :class:`SampleRecord`: the row's question and answer, the templated prompt the
  policy saw, the completion text, its response token count, whether it was truncated (vLLM
  finish reason ``length``: it hit ``rollout.max_new_tokens`` or ``max_model_len``,
  ``troupe.core.types.Sample.truncated``), its reward parts (``Group.reward_parts``: each reward
  function's own, unweighted score) and its combined reward.
* **Filters** (``rejection.filters``, applied in that list's order; a removed sample is counted under
  the first filter it fails, so the counts add up to the samples removed):

  - ``correct``: verifier-correct, R1's "retain only the correct ones": the score of
    ``rejection.correct_function`` (a ``reward.functions`` name, default ``accuracy``) is
    ``>= rejection.correct_threshold``; an unscored sample (None: the function failed, or the row was
    routed away from it by ``reward.route_by``) fails.
  - ``format``: R1's format reward (``troupe.reward.verifiers.format_reward``) is 1: a ``<think>``
    block then an ``<answer>`` block, nothing else. That reward also accepts a completion without the
    opening ``<think>`` (for prompts that end with it, R1's template); an SFT target must be whole
    after its prompt, so here the opening tag may be missing only when the prompt ends with ``<think>``.
  - ``language``: R1's "mixed languages": ``language_consistency_reward(completion, prompt=question)``
    (share of the CoT's words in the question's script; a question without words, like "7+8", makes
    the completion's own dominant script the target) is ``>= rejection.min_language`` (default 1.0:
    one script only; digits and punctuation are not words).
  - ``length``: R1's "long paragraphs", read as long responses: never a truncated response (its
    reasoning is cut off, so it would teach the model to stop mid-thought), and with
    ``rejection.max_tokens`` at most that many response tokens. Paragraph lengths and code blocks
    are not inspected (the arithmetic and GSM8K tasks have neither).
  - ``dedup``: within one prompt, a sample whose normalized text (stripped, runs of whitespace made
    one space) equals that of an earlier sample still kept is removed (identical samples repeat the
    same gradient; R1 does not say it, it is the usual SFT-data hygiene). Not across prompts.
* **Selection**: at most ``rejection.max_per_prompt`` samples per prompt, the first that pass in
  sample order (vLLM's sample order, seeded: reproducible), so that easy prompts, where every sample
  is right, do not dominate the set.

This module imports neither Ray, torch nor vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Sequence

from troupe.reward.verifiers import format_reward, language_consistency_reward

if TYPE_CHECKING:  # pragma: no cover
    from troupe.configs.schema import RejectionSamplingConfig
    from troupe.core.types import Group

__all__ = ["FILTERS", "SampleRecord", "apply_filters", "group_records", "normalize_text", "passes_correct",
           "passes_format", "passes_language", "passes_length", "select", "unique_texts"]


@dataclass(frozen=True)
class SampleRecord:
    """One sampled response as the filters see it.

    Attributes:
        question: the row's raw question (what the language filter compares against).
        answer: the row's reference answer.
        prompt: the templated prompt text the policy saw.
        completion: the decoded response.
        num_tokens: response length in tokens.
        truncated: the response hit the token cap without ending (vLLM finish reason ``length``).
        parts: reward part name -> that function's own score (None: unscored).
        reward: the combined (weighted) reward, or None.
    """

    question: str
    answer: str
    prompt: str
    completion: str
    num_tokens: int
    truncated: bool
    parts: Mapping[str, Optional[float]] = field(default_factory=dict)
    reward: Optional[float] = None


def group_records(group: "Group") -> list[SampleRecord]:
    """The records of a scored ``troupe.core.types.Group``, in sample order (parts and reward None
    where the group has none)."""
    p = group.prompt
    out = []
    for i, s in enumerate(group.samples):
        parts = {name: (vals[i] if i < len(vals) else None) for name, vals in group.reward_parts.items()}
        reward = group.rewards[i] if i < len(group.rewards) else None
        out.append(SampleRecord(p.question, p.answer, p.text, s.text, len(s.response_ids), s.truncated,
                                MappingProxyType(parts), reward))
    return out


def passes_correct(rec: SampleRecord, cfg: "RejectionSamplingConfig") -> bool:
    """Filter ``correct``: the score of ``cfg.correct_name`` is finite and ``>= cfg.correct_threshold``."""
    score = rec.parts.get(cfg.correct_name)
    return score is not None and math.isfinite(score) and score >= cfg.correct_threshold


def passes_format(rec: SampleRecord, cfg: "RejectionSamplingConfig") -> bool:
    """Filter ``format``: R1's format reward is 1 (``<think>...</think><answer>...</answer>``), and the
    completion opens its ``<think>`` block itself unless the prompt ends with ``<think>``."""
    opened = rec.completion.lstrip().startswith("<think>") or rec.prompt.rstrip().endswith("<think>")
    return opened and format_reward(rec.completion) == 1.0


def passes_language(rec: SampleRecord, cfg: "RejectionSamplingConfig") -> bool:
    """Filter ``language``: the language consistency of the completion vs the question is
    ``>= cfg.min_language``."""
    return language_consistency_reward(rec.completion, prompt=rec.question) >= cfg.min_language


def passes_length(rec: SampleRecord, cfg: "RejectionSamplingConfig") -> bool:
    """Filter ``length``: not truncated, and at most ``cfg.max_tokens`` response tokens when set."""
    return not rec.truncated and (cfg.max_tokens is None or rec.num_tokens <= cfg.max_tokens)


def normalize_text(text: str) -> str:
    """``text`` stripped, every run of whitespace made one space (what ``dedup`` compares)."""
    return " ".join(text.split())


def unique_texts(records: Sequence[SampleRecord], cfg: "RejectionSamplingConfig") -> list[bool]:
    """Filter ``dedup`` over the samples of one prompt: True for the first sample of each normalized text."""
    seen: set[str] = set()
    keep = []
    for rec in records:
        key = normalize_text(rec.completion)
        keep.append(key not in seen)
        seen.add(key)
    return keep


def _each(test: Callable[[SampleRecord, "RejectionSamplingConfig"], bool]) -> Callable[..., list[bool]]:
    def mask(records: Sequence[SampleRecord], cfg: "RejectionSamplingConfig") -> list[bool]:
        return [test(r, cfg) for r in records]

    mask.__doc__ = f"Keep mask of {test.__name__} over a list of records."
    return mask


FILTERS: Mapping[str, Callable[[Sequence[SampleRecord], "RejectionSamplingConfig"], list[bool]]] = MappingProxyType({
    "correct": _each(passes_correct),
    "format": _each(passes_format),
    "language": _each(passes_language),
    "length": _each(passes_length),
    "dedup": unique_texts,
})
"""Filter name (``rejection.filters``) -> keep mask over the samples of one prompt. Read-only."""


def apply_filters(samples: Sequence[SampleRecord],
                  cfg: "RejectionSamplingConfig") -> tuple[list[SampleRecord], dict[str, int]]:
    """Run ``cfg.filters`` in order over the samples of one prompt.

    Returns:
        (the samples that pass every filter, in their order; filter name -> samples it removed, every
        filter of ``cfg.filters`` present, each sample counted under the first filter it fails).
    Raises:
        KeyError: a filter name that is not in :data:`FILTERS` (the config's Literal prevents it).
    """
    kept = list(samples)
    removed: dict[str, int] = {}
    for name in cfg.filters:
        mask = FILTERS[name](kept, cfg)
        removed[name] = mask.count(False)
        kept = [r for r, ok in zip(kept, mask) if ok]
    return kept, removed


def select(kept: Sequence[SampleRecord], max_per_prompt: int) -> list[SampleRecord]:
    """The first ``max_per_prompt`` of one prompt's passing samples (sample order)."""
    if max_per_prompt < 1:
        raise ValueError(f"rejection.max_per_prompt must be >= 1, got {max_per_prompt}")
    return list(kept[:max_per_prompt])
