"""Waiting on remote calls: every wait has a deadline, and every failure names what was waited for.

The one helper through which the engine group, the learner group and the weight sync wait on
Ray (``ray`` is imported inside the functions: importing this module loads nothing heavy).

    results = wait_all(refs, ["learner rank 0", "learner rank 1"], "train_step", timeout_s)

raises ``RemoteTimeout`` ("timed out after 3600 s waiting for train_step on learner rank 1") when
the deadline passes, or ``ActorFailed`` naming the first actor that died, as soon as it is known,
even while other calls are still running (a dead rank leaves its peers blocked in a collective:
waiting on them in order would hang until the collective's own timeout).
"""

from __future__ import annotations

import re
import time
from typing import Any, Optional, Sequence


class RemoteTimeout(TimeoutError):
    """A remote call did not finish within its deadline (the config key ``key``, ``cluster.rpc_timeout_s`` unless
    said); ``names`` are the actors still running, each once."""

    def __init__(self, what: str, names: list[str], timeout_s: float, key: str = "cluster.rpc_timeout_s") -> None:
        self.what, self.names, self.timeout_s = what, list(dict.fromkeys(names)), timeout_s
        super().__init__(f"timed out after {timeout_s:.0f} s ({key}) waiting for {what} on {', '.join(self.names)}")


class ActorFailed(RuntimeError):
    """An actor died (or raised) during a remote call. ``name`` is the actor, ``cause`` Ray's error."""

    def __init__(self, what: str, name: str, cause: BaseException) -> None:
        self.what, self.name, self.cause = what, name, cause
        # an exception raised inside the actor arrives as RayTaskError(X) whose first line is Ray's
        # header ("ray::Cls.method() (pid=..)"): show the exception itself (``cause.cause``)
        inner = getattr(cause, "cause", None)
        shown = inner if isinstance(inner, BaseException) and not isinstance(cause, _actor_gone()) else cause
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(shown)).strip()
        lines = [x for x in text.splitlines() if x.strip()]
        first = lines[0] if lines else type(shown).__name__
        # an actor that died in its constructor carries the constructor's traceback: its last line is the cause
        last = f" ... {lines[-1].strip()}" if len(lines) > 1 and "creation task" in first else ""
        super().__init__(f"{name} failed during {what}: {type(shown).__name__}: {first}{last}")

    @property
    def died(self) -> bool:
        """True when the actor itself is gone (not a Python exception raised inside a live actor)."""
        return isinstance(self.cause, _actor_gone())


def _actor_gone() -> tuple[type, ...]:
    """Ray's error types that mean the actor itself is gone."""
    import ray.exceptions as rex

    return (rex.RayActorError, rex.ActorUnavailableError)


def wait_all(refs: Sequence[Any], names: Sequence[str], what: str, timeout_s: float,
             fetch: Optional[Sequence[bool]] = None, key: str = "cluster.rpc_timeout_s") -> list[Any]:
    """Results of ``refs`` (in order) once all are done.

    Args:
        refs: Ray object refs, one per actor call.
        names: the actor each ref belongs to ("engine 0", "learner rank 1"), same length.
        what: the call, for messages ("train_step", "weight sync v3").
        timeout_s: deadline for all of them together, seconds.
        fetch: per ref, whether to fetch its value (default: all). A ref with ``False`` is only
            waited for and returned as the ref itself (a large value that someone else consumes);
            an error it holds is not seen here.
        key: the config key that set ``timeout_s``, named in the timeout's message.
    Raises:
        ActorFailed: the first call found to have failed (actor death or an exception in the actor).
        RemoteTimeout: the deadline passed; lists the actors whose calls are unfinished.
    """
    import ray

    index = {ref: i for i, ref in enumerate(refs)}
    out: list[Any] = [None] * len(refs)
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RemoteTimeout(what, [names[index[r]] for r in pending], timeout_s, key)
        done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 60.0), fetch_local=False)
        for ref in done:
            i = index[ref]
            out[i] = get_one(ref, names[i], what, 0) if fetch is None or fetch[i] else ref
    return out


def get_one(ref: Any, name: str, what: str, timeout_s: float) -> Any:
    """``ray.get(ref)`` with a deadline (0: the ref is known to be ready); errors as in ``wait_all``."""
    import ray
    import ray.exceptions as rex

    try:
        return ray.get(ref, timeout=timeout_s if timeout_s > 0 else None)
    except rex.GetTimeoutError:
        raise RemoteTimeout(what, [name], timeout_s) from None
    except (rex.RayActorError, rex.ActorUnavailableError, rex.RayTaskError) as e:
        raise ActorFailed(what, name, e) from e


def start_named(actor_cls: Any, name: str, args: Sequence[Any] = (), kwargs: Optional[dict] = None, **options: Any) -> Any:
    """``actor_cls.options(name=..., **options).remote(*args, **kwargs)`` under the first free name of
    ``name``, ``name.1``, ``name.2``, ...

    Names are what the Ray dashboard's actor list shows (``engine-0``, ``learner-rank-1``,
    ``reward-worker-0``); they live in the driver's namespace (a job's own by default). A replaced
    actor's name can still be held while Ray reaps the dead one, hence the suffixes.

    Args:
        actor_cls: a ``ray.remote`` class.
        name: the base name.
        args, kwargs: the constructor's arguments.
        options: Ray actor options (``num_cpus``, ``runtime_env``, ``scheduling_strategy``, ...).
    Returns:
        The actor handle.
    Raises:
        ValueError: from Ray for anything but a taken name.
    """
    for k in range(1000):
        try:
            return actor_cls.options(name=name if k == 0 else f"{name}.{k}", **options).remote(*args, **(kwargs or {}))
        except ValueError as e:
            if "already" not in str(e).lower():
                raise
    raise ValueError(f"no free actor name {name}.N for N < 1000")
