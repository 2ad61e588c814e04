"""Held-out evaluation metrics over scored groups: accuracy from any reward function, pass@k, maj@k.

Pure functions (no Ray, no engines): ``cluster/train.py``'s in-loop evaluation and ``troupe eval``
both call :func:`eval_metrics` on the groups the engines and reward workers produced.

Choices, stated up front:

* **Accuracy from a named reward function.** Any ``reward.functions`` entry can define accuracy
  (``eval.accuracy``; default: the first built-in accuracy function present, :data:`ACCURACY_REWARDS`).
  A sample is *correct* when that function's own (unweighted) score is >= ``correct_at``
  (default 1.0). Without an accuracy function only rewards are reported.
* **pass@k** is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models
  Trained on Code", eq. 1): with n samples of which c are correct,
  ``pass@k = 1 - C(n-c, k) / C(n, k)``, averaged over prompts; computed as a running product
  (the numerically stable form of the paper's figure 3).
* **maj@k** (self-consistency, Wang et al. 2022; DeepSeekMath reports maj@64): split a prompt's n
  samples into the n // k disjoint chunks of k consecutive samples (leftovers unused); in each
  chunk the most frequent answer wins (ties: the answer seen first); the chunk scores 1 when a
  sample with that answer is correct. maj@k is the chunk mean, averaged over prompts. With
  n == k it is the plain majority vote of all samples; chunking keeps it hand-countable and
  uses every sample for small k.
* **Answers** for the vote: :func:`answer_key` — the ``<answer>`` block or last ``\\boxed{}``
  (:func:`troupe.reward.verifiers.extract_answer`), numbers compared by value (``1,000`` ==
  ``1000.0``), otherwise the whitespace-normalised text; a sample with no answer does not vote.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from troupe.core.types import Group
from troupe.reward.verifiers import extract_answer, parse_number

#: built-in reward functions whose score is a 0/1 correctness (the default source of accuracy)
ACCURACY_REWARDS = ("accuracy", "gsm8k", "math")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, eq. 1).

    Args:
        n: samples drawn (>= 1); c: correct ones (0 <= c <= n); k: 1 <= k <= n.
    Returns:
        The probability that at least one of k samples drawn without replacement is correct.
    Raises:
        ValueError: arguments out of range.
    """
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def answer_key(completion: str) -> Optional[str]:
    """The answer a completion votes for: its extracted answer, numbers by exact value; None: no answer."""
    ans = extract_answer(completion)
    if ans is None or not ans.strip():
        return None
    value = parse_number(ans)
    return f"={value}" if value is not None else " ".join(ans.split())


def maj_at_k(answers: Sequence[Optional[str]], correct: Sequence[bool], k: int) -> float:
    """maj@k of one prompt: the mean over its n // k disjoint chunks of whether the chunk's majority answer is correct.

    Args:
        answers: [n] each sample's :func:`answer_key` (None: no answer, does not vote).
        correct: [n] whether each sample is correct.
        k: chunk size, 1 <= k <= n.
    Returns:
        In [0, 1]. A chunk where no sample has an answer scores 0.
    Raises:
        ValueError: k out of range, or the two lists differ in length.
    """
    n = len(answers)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"maj_at_k: {n} answers, {len(correct)} correctness flags, k={k} (need equal lengths, 1 <= k <= n)")
    chunks = n // k
    score = 0.0
    for j in range(chunks):
        a, ok = answers[j * k:(j + 1) * k], correct[j * k:(j + 1) * k]
        votes = Counter(x for x in a if x is not None)
        if not votes:
            continue
        top = max(votes.values())
        winner = next(x for x in a if x is not None and votes[x] == top)  # ties: the first seen
        score += float(any(o for x, o in zip(a, ok) if x == winner))
    return score / chunks


def accuracy_function(names: Sequence[str], configured: Optional[str] = None) -> Optional[str]:
    """The reward function that defines accuracy: ``configured`` (``eval.accuracy``), else the first of
    :data:`ACCURACY_REWARDS` among ``names``, else None.

    Raises:
        ValueError: ``configured`` is not one of ``names`` (message names ``eval.accuracy``).
    """
    if configured is not None:
        if configured not in names:
            raise ValueError(f"eval.accuracy {configured!r} is not a reward.functions name ({list(names)})")
        return configured
    return next((n for n in ACCURACY_REWARDS if n in names), None)


def eval_metrics(groups: Sequence[Group], accuracy: Optional[str], ks: Sequence[int] = (1,),
                 correct_at: float = 1.0, prefix: str = "eval/") -> dict:
    """Accuracy, pass@k and maj@k over scored groups (n samples per prompt each).

    Args:
        groups: scored groups; ``reward_parts[accuracy]`` holds each sample's own score
            (None: the function failed on it, counted as not correct).
        accuracy: the reward function defining correctness (:func:`accuracy_function`), or None.
        ks: the k of pass@k / maj@k; a k larger than a group's size is skipped for that group.
        correct_at: the score from which a sample is correct.
        prefix: key prefix.
    Returns:
        ``{prefix}accuracy`` (mean correctness over all samples: with n = 1, the greedy accuracy),
        ``{prefix}pass@k`` and ``{prefix}maj@k`` for each k, ``{prefix}samples_per_prompt``.
        Empty when ``accuracy`` is None or there are no groups.
    """
    if accuracy is None or not groups:
        return {}
    flags = [[v is not None and v >= correct_at for v in g.reward_parts.get(accuracy, [None] * g.size)]
             for g in groups]
    out = {f"{prefix}accuracy": sum(map(sum, flags)) / max(sum(map(len, flags)), 1),
           f"{prefix}samples_per_prompt": sum(g.size for g in groups) / len(groups)}
    for k in ks:
        usable = [(g, f) for g, f in zip(groups, flags) if g.size >= k]
        if not usable:
            continue
        out[f"{prefix}pass@{k}"] = sum(pass_at_k(g.size, sum(f), k) for g, f in usable) / len(usable)
        out[f"{prefix}maj@{k}"] = sum(maj_at_k([answer_key(s.text) for s in g.samples], f, k)
                                      for g, f in usable) / len(usable)
    return out
