"""Reward functions with injected faults, for tests/test_reward_pool.py.

Loaded by name (``reward_plugins:<function>``) in the test process and in Ray reward
workers (the tests put this folder on PYTHONPATH). Each has the TRL reward signature
``fn(prompts, completions, **columns) -> list[float | None]``.

Completions used by the tests are strings like ``"ok 3"``; a fault is triggered by a keyword
in the completion (``boom``, ``hang``, ``nan``, ``str``, ``none``), so one bad sample sits
among good ones. The score of a good sample is the number after ``ok``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time


def _value(completion: str) -> float:
    parts = completion.split()
    return float(parts[1]) if len(parts) > 1 and parts[0] == "ok" else 0.0


def good(prompts, completions, **kwargs):
    """The number after 'ok' in each completion."""
    return [_value(c) for c in completions]


def raises_on_boom(prompts, completions, **kwargs):
    """Raises RuntimeError if any completion is 'boom'."""
    if any(c == "boom" for c in completions):
        raise RuntimeError("boom")
    return [_value(c) for c in completions]


def hangs_on_hang(prompts, completions, **kwargs):
    """Sleeps 30 s if any completion is 'hang' (past any test timeout)."""
    if any(c == "hang" for c in completions):
        time.sleep(30)
    return [_value(c) for c in completions]


def nan_on_nan(prompts, completions, **kwargs):
    """NaN for 'nan' completions."""
    return [float("nan") if c == "nan" else _value(c) for c in completions]


def str_on_str(prompts, completions, **kwargs):
    """The string '1.0' for 'str' completions (a wrong type)."""
    return ["1.0" if c == "str" else _value(c) for c in completions]


def none_on_none(prompts, completions, **kwargs):
    """None ("no score") for 'none' completions."""
    return [None if c == "none" else _value(c) for c in completions]


def wrong_length(prompts, completions, **kwargs):
    """Always one score too many."""
    return [1.0] * (len(completions) + 1)


def scalar(prompts, completions, **kwargs):
    """A bare float instead of a list."""
    return 1.0


async def async_good(prompts, completions, **kwargs):
    """Async version of :func:`good`."""
    await asyncio.sleep(0)
    return [_value(c) for c in completions]


def uses_answer(prompts, completions, answer, **kwargs):
    """1.0 where the completion equals its answer column."""
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def has_marker(prompts, completions, **kwargs):
    """1.0 where the ``marker`` column is set, 0.0 where it is None; raises if given ``steps``."""
    if "steps" in kwargs:
        raise TypeError("an outcome function got steps")
    return [0.0 if m is None else 1.0 for m in kwargs.get("marker", [None] * len(completions))]


def crash_once(prompts, completions, marker, **kwargs):
    """Kills the worker process (os._exit) the first time it runs, then scores 1.0.

    ``marker`` is a column holding a file path: the file is created just before the first
    crash, and its existence means "already crashed". It is created atomically (``O_EXCL``), so
    when several workers get here at once only one of them crashes.
    """
    try:
        fd = os.open(marker[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return [1.0 for _ in completions]
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def slow(prompts, completions, **kwargs):
    """Sleeps 0.05 s per call, then 1.0 per completion (for kill-mid-batch tests)."""
    time.sleep(0.05)
    return [1.0 for _ in completions]


def no_kwargs(prompts, completions):
    """Wrong signature: no **kwargs."""
    return [0.0 for _ in completions]


def positional_only(prompts, completions, /, **kwargs):
    """Wrong signature: prompts/completions cannot be passed by keyword (TRL passes keywords)."""
    return [0.0 for _ in completions]


def wedge_on_wedge(prompts, completions, **kwargs):
    """Catastrophic regex backtracking for 'wedge' completions: C code holding the GIL for
    hours, which no thread timeout can interrupt (the pool's heartbeat must catch it)."""
    for c in completions:
        if c == "wedge":
            re.match(r"(a+)+$", "a" * 64 + "b")
    return [_value(c) for c in completions]


NOT_CALLABLE = 3


def kill_on_kill(prompts, completions, **kwargs):
    """Kills the worker process (os._exit) whenever a completion is "kill", every time; else 1.0."""
    if "kill" in completions:
        os._exit(1)
    return [1.0 for _ in completions]
