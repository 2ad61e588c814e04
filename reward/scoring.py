"""Score a batch of completions with several reward functions, surviving bad ones.

No Ray here: the reward workers (``troupe.reward.pool``) and ``troupe score``
(``troupe.cluster.score_cli``) both load a :class:`RewardSet` from the run's ``RewardConfig``
and score in-process with :meth:`RewardSet.score` (which calls :func:`score_batch`).

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
one more keyword, ``steps`` ([N] lists of step texts, ``troupe.core.steps.step_texts``), and
return per completion a list with one score per step (None for a step = no score for that
step, NaN in ``step_rewards``; a list of only None = no score for the sample). A list of the
wrong length counts as ``"type"``, a NaN or inf element as ``"nan"``. They fill
``ScoreResult.step_rewards``: ``step_rewards[i][j] = sum_{f process} weight_f * s_f[i][j]``
plus, on the last step, the outcome functions' weighted sum (which replaces a NaN last step).
Their part score (and their share of ``reward[i]``) is the mean of their valid step scores.

Templated prompts: with ``prompt_texts`` ([N] prompts as the policy saw them, chat template or
raw format applied; the reward workers pass ``Prompt.text``), every function also gets the
keyword ``prompt_texts`` (a per-sample call its one-element slice). Reward models score
``prompt_text + completion + EOS`` (``troupe.reward.model``); rule functions may ignore it.

Reward models (``RewardConfig.models``): :class:`RewardSet` loads each as a
``troupe.reward.model.RewardModelScorer``, an ordinary part named ``model.name``. A forward pass
cannot be interrupted and the scorer runs one at a time (a lock), so for a model a timeout is
not retried sample by sample: once one of its calls times out, its remaining samples count as
``"timeout"`` without further calls (``stop_on_timeout``); an exception in its batch call (e.g.
one text the model cannot take) still falls back to per-sample calls.

Per-row routing (``RewardConfig.route_by``; DeepSeek-R1's final stage): a function or model
with ``tasks`` applies to sample i only when the sample's ``columns[route_by][i]``, compared as
text, is one of them (``tasks`` None: every sample; a sample without the column matches only
those). :meth:`RewardSet.score` scores each set of samples that share their applicable functions
with one :func:`score_batch` call and assembles one result: a function that does not apply to a
sample has part None and error None there (not a failure, not a None score; ``ScoreResult.applied``
says which applied); ``reward[i]`` sums the applicable functions only. A sample no function
applies to gets reward None and counts ``failures["unrouted"]`` (once per sample).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import numbers
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Collection,
    Iterable,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Union,
)

from troupe.core.steps import step_texts
from troupe.reward.registry import load_reward_function

if TYPE_CHECKING:
    from troupe.configs.schema import RewardConfig, RewardFunctionConfig, RewardModelConfig

__all__ = [
    "FAILURE_CAUSES",
    "RESERVED_COLUMNS",
    "RESERVED_KEYWORDS",
    "RewardPart",
    "RewardSet",
    "ScoreResult",
    "call_with_timeout",
    "check_reward_config",
    "column_names",
    "config_parts",
    "part_names",
    "reward_columns",
    "route_matches",
    "score_batch",
]

FAILURE_CAUSES = ("exception", "timeout", "nan", "type")
"""The failure causes :func:`score_batch` counts, in ``ScoreResult.failures``."""

RESERVED_COLUMNS = ("prompts", "completions", "steps")
"""The first keywords troupe passed to reward functions itself; see :data:`RESERVED_KEYWORDS`."""

RESERVED_KEYWORDS = RESERVED_COLUMNS + ("prompt_texts",)
"""Every keyword troupe itself passes to reward functions (``RESERVED_COLUMNS`` and
``prompt_texts``); no data column may take these names (:func:`score_batch` rejects such a
column, :func:`column_names` leaves it out)."""

UNROUTED = "unrouted"
"""``ScoreResult.failures`` key: samples no function or model applies to (per-row routing)."""

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
        applied: per-row routing only (:meth:`RewardSet.score` with ``route_by``): function
            name -> [N] whether the function applied to the sample; empty = every function
            applied to every sample.
    """

    rewards: list[Optional[float]]
    parts: dict[str, list[Optional[float]]]
    failures: dict[str, int] = field(default_factory=dict)
    none_count: int = 0
    errors: dict[str, list[Optional[str]]] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    step_rewards: list[Optional[list[float]]] = field(default_factory=list)
    applied: dict[str, list[bool]] = field(default_factory=dict)

    def select(self, start: int, stop: int) -> "ScoreResult":
        """The result of samples ``start .. stop-1`` alone (e.g. one group of a batch scored at once).

        ``failures`` and ``none_count`` are recounted from ``errors``, ``parts`` and ``applied``
        (so the selections of a partition add up to this result's counts); ``messages`` are
        copied whole (they are per function, not per sample).
        """
        names = list(self.parts)
        parts = {n: self.parts[n][start:stop] for n in names}
        errors = {n: self.errors.get(n, [None] * len(self.rewards))[start:stop] for n in names}
        applied = {n: v[start:stop] for n, v in self.applied.items()}
        out = ScoreResult(rewards=self.rewards[start:stop], parts=parts, errors=errors, messages=dict(self.messages),
                          step_rewards=self.step_rewards[start:stop], applied=applied)
        for i in range(stop - start):
            routed = False
            for n in names:
                if applied and not applied[n][i]:
                    continue
                routed = True
                cause = errors[n][i]
                if cause is not None:
                    out.failures[cause] = out.failures.get(cause, 0) + 1
                elif parts[n][i] is None:
                    out.none_count += 1
            if not routed:
                out.failures[UNROUTED] = out.failures.get(UNROUTED, 0) + 1
        return out


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
    stop_on_timeout: bool = False,
) -> tuple[list[Any], list[Optional[str]], Optional[str]]:
    """(scores, causes, first message) for one function over the batch; ``check(value, i)`` validates.

    ``columns`` holds every keyword besides ``prompts`` and ``completions`` ([N] values each);
    with ``stop_on_timeout`` the first timed-out call marks every sample not yet scored as
    ``"timeout"`` and no further call is made (module docstring: reward models)."""
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
        if stop_on_timeout:
            return scores, ["timeout"] * n, message
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
            if stop_on_timeout:
                causes[i + 1:] = ["timeout"] * (n - i - 1)
                break
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


def _check_arguments(names: list[str], num_prompts: int, n: int, columns: Mapping[str, Sequence[Any]],
                     on_failure: str, process: Collection[str], steps: Optional[Sequence[Sequence[str]]],
                     prompt_texts: Optional[Sequence[str]] = None) -> None:
    """Raise ValueError for the caller errors listed in :func:`score_batch` (``n`` completions)."""
    if num_prompts != n:
        raise ValueError(f"score_batch: {num_prompts} prompts for {n} completions")
    if prompt_texts is not None and len(prompt_texts) != n:
        raise ValueError(f"score_batch: {len(prompt_texts)} prompt_texts for {n} completions")
    for k, v in columns.items():
        if len(v) != n:
            raise ValueError(f"score_batch: column {k!r} has {len(v)} values for {n} completions")
        if k in RESERVED_KEYWORDS:
            raise ValueError(f"score_batch: column name {k!r} is reserved")
    if on_failure not in ("zero", "exclude"):
        raise ValueError(f"score_batch: on_failure must be 'zero' or 'exclude', got {on_failure!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"score_batch: duplicate reward function names {names}")
    if set(process) - set(names):
        raise ValueError(f"score_batch: process functions {sorted(set(process) - set(names))} are not in fns")
    if process and (steps is None or len(steps) != n or any(len(st) < 1 for st in steps)):
        raise ValueError("score_batch: process functions need steps: [N] lists of at least one step text")


def _score_part(
    fn: Callable,
    is_process: bool,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    columns: Mapping[str, Sequence[Any]],
    steps: Optional[Sequence[Sequence[str]]],
    timeout_s: float,
    batch_timeout_s: float,
    stop_on_timeout: bool = False,
) -> tuple[list[Any], list[Optional[str]], Optional[str]]:
    """(scores, causes, first message) of one function; a process function also gets ``steps``
    and returns [S_i] scores per sample (``_check_steps``), an outcome one a score (``_check_value``)."""
    if is_process:
        cols = {**columns, "steps": [list(st) for st in steps]}
        check = lambda v, i: _check_steps(v, len(steps[i]))  # noqa: E731
    else:
        cols, check = columns, lambda v, i: _check_value(v)  # noqa: E731
    return _score_one_function(fn, list(prompts), list(completions), cols, timeout_s, batch_timeout_s, check,
                               stop_on_timeout)


@dataclass
class _Sums:
    """Running weighted sums of :func:`score_batch` over the functions, per sample.

    Attributes:
        totals: [N] sum over all functions (a process function by the mean of its step scores).
        outcome: [N] sum over the outcome functions only (added to the last step).
        per_step: [N][S_i] sum over the process functions per step (empty without them).
        excluded: [N] True where the combined reward is None.
    """

    totals: list[float]
    outcome: list[float]
    per_step: list[list[float]]
    excluded: list[bool]

    @classmethod
    def start(cls, n: int, steps: Optional[Sequence[Sequence[str]]]) -> "_Sums":
        per_step = [[0.0] * len(st) for st in steps] if steps is not None else []
        return cls([0.0] * n, [0.0] * n, per_step, [False] * n)

    def add(
        self, result: ScoreResult, weight: float, scores: list[Any], part: list[Optional[float]],
        causes: list[Optional[str]], is_process: bool, on_failure: str,
    ) -> None:
        """Add one function's weighted scores; count its failures and Nones in ``result``."""
        for i, cause in enumerate(causes):
            if cause is not None:
                result.failures[cause] = result.failures.get(cause, 0) + 1
                self.excluded[i] = self.excluded[i] or on_failure == "exclude"
            elif scores[i] is None:
                result.none_count += 1
                self.excluded[i] = True
            elif is_process:
                self.totals[i] += weight * part[i]
                self.per_step[i] = [acc + weight * x for acc, x in zip(self.per_step[i], scores[i])]
            else:
                self.totals[i] += weight * scores[i]
                self.outcome[i] += weight * scores[i]

    def rewards(self) -> list[Optional[float]]:
        return [None if ex else total for total, ex in zip(self.totals, self.excluded)]

    def step_rewards(self, has_outcome: bool) -> list[Optional[list[float]]]:
        """Per-step sums with the outcome sum added to the last step (replacing a NaN last step
        when there are outcome functions); None for an excluded sample."""
        out: list[Optional[list[float]]] = []
        for steps, outcome, excluded in zip(self.per_step, self.outcome, self.excluded):
            if excluded:
                out.append(None)
                continue
            last = outcome if (math.isnan(steps[-1]) and has_outcome) else steps[-1] + outcome
            out.append(steps[:-1] + [last])
        return out


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
    prompt_texts: Optional[Sequence[str]] = None,
    stop_on_timeout: Collection[str] = (),
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
        prompt_texts: [N] templated prompts (what the policy saw); when given, every function
            also gets the keyword ``prompt_texts`` (module docstring).
        stop_on_timeout: names (from ``fns``) whose calls are not retried after a timeout
            (reward models; module docstring).
    Returns:
        A :class:`ScoreResult`.
    Raises:
        ValueError: only for caller errors (lengths of prompts/prompt_texts/columns/steps differ
            from completions, a column named in ``RESERVED_KEYWORDS``, duplicate names, unknown
            process names, bad ``on_failure``), never for a bad reward function.
    """
    n, names = len(completions), [name for name, _, _ in fns]
    _check_arguments(names, len(prompts), n, columns, on_failure, process, steps, prompt_texts)
    if prompt_texts is not None:
        columns = {**columns, "prompt_texts": list(prompt_texts)}
    result = ScoreResult(rewards=[None] * n, parts={})
    if n == 0:
        result.parts = {name: [] for name in names}
        result.errors = {name: [] for name in names}
        return result
    batch_timeout = timeout_s if batch_timeout_s is None else batch_timeout_s
    sums = _Sums.start(n, steps if process else None)
    for name, fn, weight in fns:
        is_process = name in process
        scores, causes, message = _score_part(
            fn, is_process, prompts, completions, columns, steps, timeout_s, batch_timeout, name in stop_on_timeout
        )
        result.parts[name] = [_nanmean(v) for v in scores] if is_process else scores
        result.errors[name] = causes
        if message:
            result.messages[name] = message
        sums.add(result, weight, scores, result.parts[name], causes, is_process, on_failure)
    result.rewards = sums.rewards()
    if process:
        result.step_rewards = sums.step_rewards(has_outcome=len(process) < len(fns))
    return result


def _nanmean(v: Optional[list[float]]) -> Optional[float]:
    """Mean of the non-NaN entries (None for None; ``_check_steps`` never returns all-NaN)."""
    if v is None:
        return None
    valid = [x for x in v if not math.isnan(x)]
    return math.fsum(valid) / len(valid)


def column_names(rows: Iterable[Mapping[str, Any]], skip: Collection[str] = ()) -> list[str]:
    """The data columns to hand to reward functions besides ``answer``.

    Args:
        rows: mappings of column name -> value (a prompt's ``columns``, an input row).
        skip: more names to leave out (e.g. the fields ``troupe score`` reads itself).
    Returns:
        Every key of any row, in first-seen order, except ``answer`` (the caller fills it from
        the reference, :func:`reward_columns`), ``RESERVED_KEYWORDS`` and ``skip``.
    """
    keys: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k != "answer" and k not in RESERVED_KEYWORDS and k not in skip:
                keys.setdefault(k)
    return list(keys)


def reward_columns(
    answers: Sequence[Any], rows: Sequence[Mapping[str, Any]], keys: Sequence[str]
) -> dict[str, list[Any]]:
    """The ``columns`` argument of :meth:`RewardSet.score` for N samples.

    Args:
        answers: [N] reference answers (the ``answer`` column).
        rows: [N] mappings the other columns are read from (one per sample).
        keys: column names (:func:`column_names`); a row without a key gives None.
    Returns:
        ``{"answer": [N], key: [N] for key in keys}``.
    """
    columns: dict[str, list[Any]] = {"answer": list(answers)}
    for k in keys:
        columns[k] = [row.get(k) for row in rows]
    return columns


class RewardPart(NamedTuple):
    """One reward function or reward model of a ``RewardConfig`` (:func:`config_parts`).

    Attributes:
        name: its part name (key of ``ScoreResult.parts`` and ``Group.reward_parts``).
        spec: its ``RewardFunctionConfig`` or ``RewardModelConfig``.
        key: its dotted config key, ``"functions.<i>"`` or ``"models.<i>"`` (for messages).
        tasks: the route values it scores (``spec.tasks``), or None: every row.
    """

    name: str
    spec: Union["RewardFunctionConfig", "RewardModelConfig"]
    key: str
    tasks: Optional[frozenset[str]]

    @property
    def is_model(self) -> bool:
        """True for a reward model (``reward.models``)."""
        return self.key.startswith("models.")


def config_parts(cfg: "RewardConfig") -> list[RewardPart]:
    """The parts of a ``RewardConfig``: its functions, then its models, in config order.

    Part names are :func:`part_names` of the function specs followed by the model names
    (a model's ``name``), so a config's rule functions keep the names they have alone.

    Raises:
        ValueError: two parts end up with the same name.
    """
    functions, models = list(cfg.functions), list(cfg.models)
    names = part_names([f.name for f in functions] + [m.name for m in models])
    if len(set(names)) != len(names):
        raise ValueError(f"reward: part names {names} are not unique; rename a reward model (reward.models.N.name)")
    keys = [f"functions.{i}" for i in range(len(functions))] + [f"models.{i}" for i in range(len(models))]
    return [RewardPart(name, spec, key, None if spec.tasks is None else frozenset(spec.tasks))
            for name, spec, key in zip(names, functions + models, keys)]


def route_matches(tasks: Optional[Collection[str]], value: Any) -> bool:
    """Whether a part with ``tasks`` scores a row whose route column holds ``value``.

    ``tasks`` None: every row; else the value, compared as text (``str(value)``), must be one of
    them; a row without the column (``value`` None) matches only parts with ``tasks`` None.
    """
    if tasks is None:
        return True
    return value is not None and str(value) in tasks


def check_model_folder(path: str, key: str = "models.0") -> None:
    """Cheap check of a reward-model folder, without loading weights: ``config.json`` is there
    and is a JSON object.

    Raises:
        ValueError: naming ``reward.<key>.path`` and the folder.
    """
    f = Path(path) / "config.json"
    try:
        config = json.loads(f.read_text())
    except FileNotFoundError:
        raise ValueError(f"reward.{key}.path: {path!r} is not a model folder (no config.json there; "
                         f"working directory {Path.cwd()})") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"reward.{key}.path: cannot read {str(f)!r}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"reward.{key}.path: {str(f)!r} is not a JSON object")


def _load_function(f: "RewardFunctionConfig") -> Callable:
    """``load_reward_function`` of a function config, with its ``options``."""
    return load_reward_function(f.name, f.options or None)


def _load_part(p: RewardPart) -> Callable:
    if not p.is_model:
        return _load_function(p.spec)
    from troupe.reward.model import RewardModelScorer

    m = p.spec
    return RewardModelScorer(m.path, batch_size=m.batch_size, normalize=m.normalize, max_length=m.max_length,
                             device="cuda" if m.num_gpus > 0 else "cpu")


def check_reward_config(cfg: "RewardConfig") -> list[str]:
    """What a driver checks before starting reward actors, cheaply: the rule functions load
    (:func:`troupe.reward.registry.load_reward_function`), every reward model's folder has a
    readable ``config.json`` (:func:`check_model_folder`; no weights are loaded) and the
    ``reward.iterative.data`` file, when given, exists.

    Returns:
        The part names (:func:`config_parts`).
    Raises:
        ValueError: no parts, a spec that cannot be loaded, a bad model folder (messages name them).
    """
    parts = config_parts(cfg)
    if not parts:
        raise ValueError("no reward functions configured")
    for p in parts:
        if p.is_model:
            check_model_folder(p.spec.path, p.key)
        else:
            _load_function(p.spec)
    it = cfg.iterative
    if it is not None and it.data and not Path(it.data).is_file():
        raise ValueError(f"reward.iterative.data: file not found: {it.data} (working directory {Path.cwd()})")
    return [p.name for p in parts]


class RewardSet:
    """The reward functions and models of a ``RewardConfig``, loaded once, and how to score with them.

    The reward workers (``troupe.reward.pool.RewardWorker``) and ``troupe score`` both score
    through this class, so the two apply the functions the same way.

    Args:
        cfg: a ``troupe.configs.schema.RewardConfig``: ``functions`` (each a spec for
            :func:`troupe.reward.registry.load_reward_function` with its ``options``, a weight, a
            kind and ``tasks``), ``models`` (each loaded as a
            ``troupe.reward.model.RewardModelScorer``, on ``cuda`` when its ``num_gpus`` > 0),
            ``route_by``, ``timeout_s``, ``on_failure``, ``step_delimiter``.
    Attributes:
        parts: [F] :class:`RewardPart` (functions, then models).
        names: [F] part names in config order (:func:`config_parts`; keys of ``ScoreResult.parts``).
        process: the part names of the functions of kind ``process``.
        models: the part names of the reward models.
        fns: [F] (name, function, weight), as :func:`score_batch` takes them.
        route_by: the routing column, or None.
        timeout_s, on_failure, step_delimiter: from ``cfg``.
    Raises:
        ValueError: no functions, a spec or model folder cannot be loaded (the message names it;
            plugin modules must be importable in this process).
    """

    def __init__(self, cfg: "RewardConfig") -> None:
        self.parts: list[RewardPart] = config_parts(cfg)
        if not self.parts:
            raise ValueError("no reward functions configured")
        self.names: list[str] = [p.name for p in self.parts]
        self.process: frozenset[str] = frozenset(
            p.name for p in self.parts if not p.is_model and p.spec.kind == "process")
        self.models: frozenset[str] = frozenset(p.name for p in self.parts if p.is_model)
        self.route_by: Optional[str] = cfg.route_by
        self.timeout_s = float(cfg.timeout_s)
        self.on_failure: Literal["zero", "exclude"] = cfg.on_failure
        self.step_delimiter: str = cfg.step_delimiter
        self.fns: list[tuple[str, Callable, float]] = [
            (p.name, _load_part(p), float(p.spec.weight)) for p in self.parts
        ]

    @property
    def routed(self) -> bool:
        """True when some part scores only some rows (``route_by`` and a part with ``tasks``)."""
        return self.route_by is not None and any(p.tasks is not None for p in self.parts)

    def steps(self, completions: Sequence[Any]) -> list[list[str]]:
        """[N] lists of the step texts of each completion (``troupe.core.steps.step_texts`` at
        ``step_delimiter``; at least one step each)."""
        return [step_texts(str(c), self.step_delimiter) for c in completions]

    def score(
        self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]],
        prompt_texts: Optional[Sequence[str]] = None,
    ) -> ScoreResult:
        """Score N completions with every function and combine them (:func:`score_batch`).

        With process functions the completions are cut into steps first (:meth:`steps`) and
        ``ScoreResult.step_rewards`` is filled. With per-row routing (:attr:`routed`) each sample
        is scored by its applicable parts only (module docstring; ``ScoreResult.applied``).

        Args:
            prompts: [N] prompts (raw questions).
            completions: [N] completions.
            columns: column name -> [N] values (:func:`reward_columns`; ``answer`` for the
                built-ins; the ``route_by`` column for routing).
            prompt_texts: [N] templated prompts (what the policy saw), passed to every function
                as the keyword ``prompt_texts``; reward models score them with the completions
                (without them, a model scores the raw ``prompts``).
        Returns:
            A :class:`ScoreResult`.
        Raises:
            ValueError: caller errors only (lengths differ, a column in ``RESERVED_KEYWORDS``).
        """
        if not self.routed:
            return self._score(self.fns, self.process, prompts, completions, columns, prompt_texts,
                               self.steps(completions) if self.process else None)
        return self._score_routed(prompts, completions, columns, prompt_texts)

    def _score(self, fns: list[tuple[str, Callable, float]], process: Collection[str], prompts: Sequence[Any],
               completions: Sequence[Any], columns: Mapping[str, Sequence[Any]],
               prompt_texts: Optional[Sequence[str]], steps: Optional[Sequence[Sequence[str]]]) -> ScoreResult:
        return score_batch(
            fns, prompts, completions, columns,
            timeout_s=self.timeout_s,
            on_failure=self.on_failure,
            process=process,
            steps=steps,
            prompt_texts=prompt_texts,
            stop_on_timeout=self.models,
        )

    def _score_routed(self, prompts: Sequence[Any], completions: Sequence[Any], columns: Mapping[str, Sequence[Any]],
                      prompt_texts: Optional[Sequence[str]]) -> ScoreResult:
        """:meth:`score` with routing: one :func:`score_batch` per set of samples that share their
        applicable parts, assembled into one result (module docstring)."""
        n = len(completions)
        _check_arguments(self.names, len(prompts), n, columns, self.on_failure, (), None, prompt_texts)
        values = list(columns[self.route_by]) if self.route_by in columns else [None] * n
        subsets: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(values):
            key = tuple(j for j, p in enumerate(self.parts) if route_matches(p.tasks, v))
            subsets.setdefault(key, []).append(i)
        out = ScoreResult(rewards=[None] * n, parts={name: [None] * n for name in self.names},
                          errors={name: [None] * n for name in self.names},
                          applied={name: [False] * n for name in self.names})
        all_steps = self.steps(completions) if self.process else None
        if self.process:
            out.step_rewards = [None] * n
        for key, idx in subsets.items():
            if not key:
                out.failures[UNROUTED] = out.failures.get(UNROUTED, 0) + len(idx)
                continue
            fns = [self.fns[j] for j in key]
            process = self.process & {name for name, _, _ in fns}
            sub = self._score(
                fns, process, [prompts[i] for i in idx], [completions[i] for i in idx],
                {k: [v[i] for i in idx] for k, v in columns.items()},
                None if prompt_texts is None else [prompt_texts[i] for i in idx],
                [all_steps[i] for i in idx] if process else None,
            )
            for local, i in enumerate(idx):
                out.rewards[i] = sub.rewards[local]
                for name, _, _ in fns:
                    out.parts[name][i] = sub.parts[name][local]
                    out.errors[name][i] = sub.errors[name][local]
                    out.applied[name][i] = True
                if process:
                    out.step_rewards[i] = sub.step_rewards[local]
                elif self.process:  # no process function for this sample: its steps are unscored
                    r = sub.rewards[local]
                    out.step_rewards[i] = None if r is None else [math.nan] * (len(all_steps[i]) - 1) + [r]
            for cause, count in sub.failures.items():
                out.failures[cause] = out.failures.get(cause, 0) + count
            out.none_count += sub.none_count
            for name, message in sub.messages.items():
                out.messages.setdefault(name, message)
        return out
