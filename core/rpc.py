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

import time
from typing import Any, Sequence


class RemoteTimeout(TimeoutError):
    """A remote call did not finish within ``cluster.rpc_timeout_s``; ``names`` are the actors still running."""

    def __init__(self, what: str, names: list[str], timeout_s: float) -> None:
        self.what, self.names, self.timeout_s = what, names, timeout_s
        super().__init__(f"timed out after {timeout_s:.0f} s (cluster.rpc_timeout_s) waiting for {what} on "
                         f"{', '.join(names)}")


class ActorFailed(RuntimeError):
    """An actor died (or raised) during a remote call. ``name`` is the actor, ``cause`` Ray's error."""

    def __init__(self, what: str, name: str, cause: BaseException) -> None:
        self.what, self.name, self.cause = what, name, cause
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"{name} failed during {what}: {type(cause).__name__}: {first}")

    @property
    def died(self) -> bool:
        """True when the actor itself is gone (not a Python exception raised inside a live actor)."""
        import ray.exceptions as rex

        return isinstance(self.cause, (rex.RayActorError, rex.ActorUnavailableError))


def wait_all(refs: Sequence[Any], names: Sequence[str], what: str, timeout_s: float) -> list[Any]:
    """Results of ``refs`` (in order) once all are done.

    Args:
        refs: Ray object refs, one per actor call.
        names: the actor each ref belongs to ("engine 0", "learner rank 1"), same length.
        what: the call, for messages ("train_step", "weight sync v3").
        timeout_s: deadline for all of them together, seconds.
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
            raise RemoteTimeout(what, [names[index[r]] for r in pending], timeout_s)
        done, pending = ray.wait(pending, num_returns=1, timeout=min(left, 60.0))
        for ref in done:
            out[index[ref]] = get_one(ref, names[index[ref]], what, 0)
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
