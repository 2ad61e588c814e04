"""Pipelined generation: the engines sample the next steps while the learner trains (bounded staleness).

``RolloutAhead`` runs the rollout of steps first..last on a driver thread, in step order, each
step's batch produced by the same function the synchronous loop calls (``collect_groups``: the
prompt stream, per-prompt seeds, reward scoring, dynamic-sampling refills). Step s's rollout may
start once the engines hold version >= s - 1 - N (N = ``rollout.max_staleness``), so no group it
draws lags the learner by more than N versions when step s trains (``troupe.rollout.staleness``).

    N = 0    generate(s) after sync(s-1): the synchronous loop (the loop does not use this class)
    N = 1    generate(s+1) runs while the learner trains step s (veRL's one-step-off-policy)
    N = k    up to k steps' rollouts ahead of the learner (prime-rl's async_level)

The learner side owns everything else: weight syncs, evaluation and checkpoints run while the
rollout thread is paused (``paused()`` waits for the batch in flight, then holds the next one),
so the engine group and the reward workers are only ever driven by one thread at a time; the
learner ranks only by the loop's thread. A weight sync has to wait for the engines' queued
generate calls anyway (an actor runs one call at a time), so pausing costs no overlap.

Prompt-stream order stays reproducible: only the rollout thread takes prompts, in step order;
before each step's first take it snapshots the stream (``stream_state_before(step)``), which is
what a checkpoint after step s - 1 saves. A resumed pipelined run therefore samples the prefetched
steps again from the checkpoint's weights (same prompts, same seeds, staleness 0 for the first of
them): it continues the run but is not bit-identical to an uninterrupted pipelined one (the
synchronous loop is). An exception in the rollout thread is re-raised by ``get``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator, Optional

from troupe.core.types import Group


class RolloutAhead:
    """Step batches sampled ahead of the learner, at most ``max_staleness`` policy versions behind.

    Args:
        produce: ``produce(step) -> (groups, info)``: one step's scored groups and its timings
            (``collect_groups`` bound to the run's actors, stream and config).
        first, last: the steps to produce, inclusive.
        max_staleness: N >= 1.
        version: the policy version the engines hold now (the gate's starting point).
        snapshot: ``snapshot() -> dict``: the prompt stream's ``state_dict()`` (taken by the rollout
            thread before each step's prompts).
    Raises:
        ValueError: ``max_staleness`` < 1 or ``last`` < ``first`` - 1.
    """

    def __init__(self, produce: Callable[[int], tuple[list[Group], dict]], first: int, last: int, max_staleness: int,
                 version: int, snapshot: Callable[[], dict]) -> None:
        if max_staleness < 1:
            raise ValueError(f"RolloutAhead: max_staleness must be >= 1, got {max_staleness} (0 is the synchronous loop)")
        if last < first - 1:
            raise ValueError(f"RolloutAhead: steps {first}..{last}")
        self._produce, self._snapshot = produce, snapshot
        self.first, self.last, self.max_staleness = first, last, max_staleness
        self._cond = threading.Condition()
        self._version = version
        self._pauses = 0          # paused() holders; the thread starts no batch while > 0
        self._busy = False        # a batch is being produced
        self._stop = False
        self._next = first        # next step the thread will produce
        self._ready: dict[int, tuple[list[Group], dict]] = {}
        self._error: Optional[BaseException] = None
        self._snaps: dict[int, dict] = {}
        self._thread = threading.Thread(target=self._run, name="troupe-rollout-ahead", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ rollout thread

    def _may_start(self, step: int) -> bool:
        return self._pauses == 0 and self._version >= step - 1 - self.max_staleness

    def _run(self) -> None:
        for step in range(self.first, self.last + 1):
            t_wait = time.time()
            with self._cond:
                while not self._stop and not self._may_start(step):
                    self._cond.wait()
                if self._stop:
                    return
                self._busy = True
                self._snaps[step] = self._snapshot()
                version = self._version
            idle = time.time() - t_wait
            try:
                groups, info = self._produce(step)
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread by get()
                with self._cond:
                    self._error, self._busy = e, False
                    self._cond.notify_all()
                return
            info = {**info, "time/engine_idle": idle, "rollout/started_at_version": float(version)}
            with self._cond:
                self._ready[step] = (groups, info)
                self._busy, self._next = False, step + 1
                self._cond.notify_all()

    # ------------------------------------------------------------ learner side

    def get(self, step: int) -> tuple[list[Group], dict]:
        """Step ``step``'s groups and info, waiting for them; info gains ``time/learner_idle`` (s waited).

        Raises whatever the rollout raised (``ActorFailed``, ``RemoteTimeout``, ``RuntimeError``...),
        and ``RuntimeError`` if ``step`` is outside first..last or the rollout was closed.
        """
        if not self.first <= step <= self.last:
            raise RuntimeError(f"RolloutAhead.get({step}): produces steps {self.first}..{self.last}")
        t0 = time.time()
        with self._cond:
            while step not in self._ready and self._error is None and not self._stop:
                self._cond.wait()
            if step in self._ready:
                groups, info = self._ready.pop(step)
            elif self._error is not None:
                raise self._error
            else:
                raise RuntimeError(f"RolloutAhead.get({step}): the rollout was closed")
            self._snaps = {s: v for s, v in self._snaps.items() if s > step}
        return groups, {**info, "time/learner_idle": time.time() - t0}

    def published(self, version: int) -> None:
        """The engines now hold ``version`` (call after a weight sync): later steps may start."""
        with self._cond:
            self._version = version
            self._cond.notify_all()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """While inside, no rollout runs: waits for the batch in flight, holds the next one."""
        with self._cond:
            self._pauses += 1
            while self._busy:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def stream_state_before(self, step: int) -> Optional[dict]:
        """The prompt stream's state before ``step``'s prompts were taken; None if not taken yet.

        Call while ``paused()``: then None means the stream itself is still at that point.
        """
        with self._cond:
            return self._snaps.get(step)

    def close(self, timeout: Optional[float] = None) -> bool:
        """Stop after the batch in flight; idempotent. Returns whether the rollout thread has ended.

        ``timeout=None`` waits for the batch in flight (at most the rollout's own remote-call
        timeouts): the normal end of a run, before the final evaluation uses the engines. On an
        error path pass a few seconds: a batch stuck on a dead actor is then abandoned (the thread
        is a daemon, and the actor teardown that follows makes its remote call fail) instead of
        holding the exit for up to ``cluster.rpc_timeout_s``.
        """
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()
