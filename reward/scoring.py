"""Score a batch of completions with several reward functions, surviving bad ones.

No Ray here: the reward workers (``troupe.reward.pool``) and ``troupe score`` both call
:func:`score_batch` in-process.

How a function is run (per function, per batch):

1. One call over the whole batch, in a daemon thread, allowed ``batch_timeout_s`` seconds
   (default: ``timeout_s``).
2. If that call raises, times out, or returns something that is not a sequence of the
   batch's length, the function is called again once per sample, each call in its own
   daemon thread allowed ``timeout_s`` seconds, one after the other, so one bad sample does
   not cost the others their scores.
3. A call that is still running at its deadline is abandoned (Python cannot kill a thread:
   it keeps running in the background until it returns) and its samples count as
   ``"timeout"``.

Limit of thread timeouts: a call stuck inside C code that holds the GIL (a huge integer
power such as SymPy evaluating ``9^{9^{9}}``, catastrophic regex backtracking) blocks the
whole interpreter, so the waiting thread cannot even notice its deadline. The built-in
``math`` verifier refuses such inputs up front (``verifiers.too_large_for_sympy``); for
arbitrary plugins, ``troupe.reward.pool.RewardPool`` detects the wedged worker process with
a heartbeat and replaces it.

Each returned value is then checked: a real finite number (bool, int, float, numpy scalar)
is a score; ``None`` means "no score for this sample" (not a failure, counted in
``ScoreResult.none_count``); NaN or +-inf count as ``"nan"``; anything else (a string, a
list, ...) as ``"type"``. A result list of the wrong length in the per-sample calls also
counts as ``"type"``.

Combining: ``reward[i] = sum_f weight_f * score_f[i]``. When a part failed, it counts as 0
if ``on_failure == "zero"``, and makes ``reward[i]`` None if ``on_failure == "exclude"``.
When a function returned None for a sample, ``reward[i]`` is None whatever the policy.
Failure counts are per (function, sample) pair: a sample on which two functions fail counts
twice.

Process reward functions (names in ``process``; DeepSeekMath 4.1.3 process supervision) get
one more keyword, ``steps`` ([N] lists of step texts, ``troupe.rollout.steps.step_texts``), and
return per completion a list with one score per step (None for a step = no score for that
step, NaN in ``step_rewards``; a list of only None = no score for the sample). A list of the
wrong length counts as ``"type"``, a NaN or inf element as ``"nan"``. They fill
``ScoreResult.step_rewards``: ``step_rewards[i][j] = sum_{f process} weight_f * s_f[i][j]``
plus, on the last step, the outcome functions' weighted sum (which replaces a NaN last step).
Their part score (and their share of ``reward[i]``) is the mean of their valid step scores.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Literal, Mapping, Optional, Sequence

__all__ = ["FAILURE_CAUSES", "ScoreResult", "call_with_timeout", "part_names", "score_batch"]

FAILURE_CAUSES = ("exception", "timeout", "nan", "type")
"""The failure causes :func:`score_batch` counts, in ``ScoreResult.failures``."""

_MAX_MESSAGE = 500


def part_names(names: Sequence[str]) -> list[str]:
    """Unique part names for reward specs: repeated names get ``#2``, ``#3``, ... suffixes.

    Args:
        names: reward function specs in config order.
    Returns:
        Names used as keys of ``ScoreResult.parts`` and ``Group.reward_parts``.
    """
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


@dataclass
class ScoreResult:
    """What :func:`score_batch` returns.

    Attributes:
        rewards: [N] combined weighted reward per sample, or None (excluded / no score).
        parts: function name -> [N] that function's own score per sample (None where it
            failed or returned None).
        failures: cause -> count of failed (function, sample) pairs, causes from
            ``FAILURE_CAUSES``; only causes that occurred appear.
        none_count: (function, sample) pairs where the function returned None ("no score").
        errors: function name -> [N] failure cause per sample (None where it scored).
        messages: function name -> the first error message seen for it (for logs).
        step_rewards: [N] combined per-step rewards ([S_i] floats, NaN = unscored step) or
            None (excluded sample); empty unless process functions were given.
    """

    rewards: list[Optional[float]]
    parts: dict[str, list[Optional[float]]]
    failures: dict[str, int] = field(default_factory=dict)
    none_count: int = 0
    errors: dict[str, list[Optional[str]]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    step_rewards: list[Optional[list[float]]] = field(default_factory=list)


def _run_maybe_async(fn: Callable, kwargs: dict) -> Any:
    out = fn(**kwargs)
    if inspect.isawaitable(out):
        if inspect.iscoroutine(out):
            return asyncio.run(out)

        async def _await() -> Any:
            return await out

        return asyncio.run(_await())
    return out


def call_with_timeout(fn: Callable, kwargs: dict, timeout_s: Optional[float]) -> Any:
    """Call ``fn(**kwargs)`` in a daemon thread and wait at most ``timeout_s`` seconds.

    Coroutine functions are run to completion with ``asyncio.run`` inside that thread.

    Args:
        fn: the callable.
        kwargs: keyword arguments.
        timeout_s: seconds to wait; None waits forever.
    Returns:
        Whatever ``fn`` returned.
    Raises:
        TimeoutError: the call did not finish in time (the thread is abandoned, still running).
        Exception: whatever ``fn`` raised, re-raised here; a ``SystemExit`` or other
            non-``Exception`` raised by ``fn`` is wrapped in ``RuntimeError``.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = _run_maybe_async(fn, kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"reward-{getattr(fn, '__name__', 'fn')}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise TimeoutError(f"reward call did not finish within {timeout_s} s")
    if "error" in box:
        err = box["error"]
        if not isinstance(err, Exception):
            raise RuntimeError(f"reward function raised {type(err).__name__}: {err}") from err
        raise err
    return box.get("value")


def _check_value(v: Any) -> tuple[Optional[float], Optional[str]]:
    """(score, None) for a usable value, (None, cause) for a failure, (None, None) for None."""
    if v is None:
        return None, None
    if isinstance(v, (str, bytes)):
        return None, "type"
    if isinstance(v, numbers.Real):
        try:
            x = float(v)
        except (TypeError, ValueError, OverflowError):
            return None, "type"
    elif hasattr(v, "__float__") and getattr(v, "ndim", 0) == 0 and not isinstance(v, (list, tuple, dict)):
        try:  # 0-d numpy arrays / torch tensors
            x = float(v)
        except (TypeError, ValueError, OverflowError):
            return None, "type"
    else:
        return None, "type"
    if not math.isfinite(x):
        return None, "nan"
    return x, None


def _check_steps(v: Any, num_steps: int) -> tuple[Optional[list[float]], Optional[str]]:
    """Like ``_check_value`` for a process function's per-sample list of ``num_steps`` scores."""
    if v is None:
        return None, None
    out = _as_list(v, num_steps)
    if out is None:
        return None, "type"
    scores = []
    for e in out:
        if e is None:
            scores.append(math.nan)
            continue
        x, cause = _check_value(e)
        if cause is not None:
            return None, cause
        scores.append(x)
    if all(math.isnan(x) for x in scores):
        return None, None
    return scores, None


def _describe(e: BaseException) -> str:
    try:
        text = f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - a broken __str__ must not break scoring
        text = type(e).__name__
    return text[:_MAX_MESSAGE]


def _as_list(out: Any, n: int) -> Optional[list]:
    if isinstance(out, (str, bytes, Mapping)) or not isinstance(out, Sequence):
        if hasattr(out, "tolist") and getattr(out, "ndim", 0) == 1:  # numpy array / torch tensor
            out = out.tolist()
        else:
            return None
    out = list(out)
    return out if len(out) == n else None


def _score_one_function(
    fn: Callable,
    prompts: list,
    completions: list,
    columns: Mapping[str, list],
    timeout_s: float,
    batch_timeout_s: float,
    check: Callable[[Any, int], tuple[Any, Optional[str]]],
) -> tuple[list[Any], list[Optional[str]], Optional[str]]:
    """(scores, causes, first message) for one function over the batch; ``check(value, i)`` validates."""
    n = len(completions)
    scores: list[Any] = [None] * n
    causes: list[Optional[str]] = [None] * n
    message: Optional[str] = None
    kwargs = {"prompts": list(prompts), "completions": list(completions)}
    kwargs.update({k: list(v) for k, v in columns.items()})
    batch_out: Optional[list] = None
    try:
        raw = call_with_timeout(fn, kwargs, batch_timeout_s)
        batch_out = _as_list(raw, n)
        if batch_out is None:
            message = f"batch call returned {type(raw).__name__}" + (
                f" of length {len(raw)} for {n} samples" if hasattr(raw, "__len__") and not isinstance(raw, str) else ""
            )
    except TimeoutError as e:
        message = f"batch call: {e}"
    except Exception as e:  # noqa: BLE001
        message = f"batch call: {_describe(e)}"
    if batch_out is not None:
        for i, v in enumerate(batch_out):
            scores[i], causes[i] = check(v, i)
        return scores, causes, message if any(causes) else None

    for i in range(n):
        one = {"prompts": [prompts[i]], "completions": [completions[i]]}
        one.update({k: [v[i]] for k, v in columns.items()})
        try:
            raw = call_with_timeout(fn, one, timeout_s)
        except TimeoutError as e:
            causes[i] = "timeout"
            message = message or f"sample {i}: {e}"
            continue
        except Exception as e:  # noqa: BLE001
            causes[i] = "exception"
            message = message or f"sample {i}: {_describe(e)}"
            continue
        out = _as_list(raw, 1)
        if out is None:
            causes[i] = "type"
            message = message or f"sample {i}: returned {type(raw).__name__}, expected a list of 1 score"
            continue
        scores[i], causes[i] = check(out[0], i)
    return scores, causes, message


def score_batch(
    fns: Sequence[tuple[str, Callable, float]],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    *,
    timeout_s: float,
    on_failure: Literal["zero", "exclude"],
    batch_timeout_s: Optional[float] = None,
    process: Collection[str] = (),
    steps: Optional[Sequence[Sequence[str]]] = None,
) -> ScoreResult:
    """Score N completions with every reward function and combine them with their weights.

    Args:
        fns: (name, function, weight) triples; names must be unique. Functions have the TRL
            signature ``fn(prompts, completions, **columns) -> list[float | None]`` and are
            called with keywords.
        prompts: [N] prompts (raw questions).
        completions: [N] completions.
        columns: column name -> [N] values (e.g. ``answer``), passed as keyword arguments.
        timeout_s: seconds allowed to each per-sample call (step 2 in the module docstring).
        on_failure: ``"zero"``: a failed part counts 0; ``"exclude"``: the sample's reward is None.
        batch_timeout_s: seconds allowed to the first whole-batch call; default ``timeout_s``.
        process: names (from ``fns``) of process reward functions (module docstring).
        steps: [N] lists of step texts (at least one each); required when ``process`` is set.
    Returns:
        A :class:`ScoreResult`.
    Raises:
        ValueError: only for caller errors (lengths of prompts/columns/steps differ from
            completions, duplicate names, unknown process names, bad ``on_failure``), never for a
            bad reward function.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"score_batch: {len(prompts)} prompts for {n} completions")
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"score_batch: column {k!r} has {len(v)} values for {n} completions")
        if k in ("prompts", "completions", "steps"):
            raise ValueError(f"score_batch: column name {k!r} is reserved")
    if on_failure not in ("zero", "exclude"):
        raise ValueError(f"score_batch: on_failure must be 'zero' or 'exclude', got {on_failure!r}")
    names = [name for name, _, _ in fns]
    if len(set(names)) != len(names):
        raise ValueError(f"score_batch: duplicate reward function names {names}")
    if set(process) - set(names):
        raise ValueError(f"score_batch: process functions {sorted(set(process) - set(names))} are not in fns")
    if process and (steps is None or len(steps) != n or any(len(st) < 1 for st in steps)):
        raise ValueError("score_batch: process functions need steps: [N] lists of at least one step text")
    batch_timeout = timeout_s if batch_timeout_s is None else batch_timeout_s

    result = ScoreResult(rewards=[None] * n, parts={})
    if n == 0:
        result.parts = {name: [] for name in names}
        result.errors = {name: [] for name in names}
        return result
    totals = [0.0] * n
    outcome = [0.0] * n
    per_step = [[0.0] * len(steps[i]) for i in range(n)] if process else []
    excluded = [False] * n
    for name, fn, weight in fns:
        is_process = name in process
        if is_process:
            cols = {**columns, "steps": [list(st) for st in steps]}
            check = lambda v, i: _check_steps(v, len(steps[i]))  # noqa: E731
        else:
            cols, check = columns, lambda v, i: _check_value(v)  # noqa: E731
        scores, causes, message = _score_one_function(
            fn, list(prompts), list(completions), cols, timeout_s, batch_timeout, check
        )
        result.parts[name] = [_nanmean(v) for v in scores] if is_process else scores
        result.errors[name] = causes
        if message:
            result.messages[name] = message
        for i in range(n):
            if causes[i] is not None:
                result.failures[causes[i]] = result.failures.get(causes[i], 0) + 1
                if on_failure == "exclude":
                    excluded[i] = True
            elif scores[i] is None:
                result.none_count += 1
                excluded[i] = True
            elif is_process:
                totals[i] += weight * result.parts[name][i]
                per_step[i] = [acc + weight * x for acc, x in zip(per_step[i], scores[i])]
            else:
                totals[i] += weight * scores[i]
                outcome[i] += weight * scores[i]
    result.rewards = [None if excluded[i] else totals[i] for i in range(n)]
    if process:
        has_outcome = len(process) < len(fns)
        for i in range(n):
            if excluded[i]:
                result.step_rewards.append(None)
                continue
            last = per_step[i][-1]
            last = outcome[i] if (math.isnan(last) and has_outcome) else last + outcome[i]
            result.step_rewards.append(per_step[i][:-1] + [last])
    return result


def _nanmean(v: Optional[list[float]]) -> Optional[float]:
    """Mean of the non-NaN entries (None for None; ``_check_steps`` never returns all-NaN)."""
    if v is None:
        return None
    valid = [x for x in v if not math.isnan(x)]
    return math.fsum(valid) / len(valid)
