"""The engine group: a run's vLLM engine actors as one object (dispatch, weight receipt, sync check,
engine health).

``EngineGroup`` owns the engine actor handles; the training loop, the weight sync and the sync
check all go through it, never through a bare list. Pipelined generation plugs in here too.

Dispatch: a batch of prompts is cut into chunks (``chunks_per_engine`` per engine); each chunk
goes to the engine with the fewest outstanding prompts, and as soon as a chunk's samples come
back it is handed to the reward pool, so scoring of early chunks overlaps generation of later ones.

Health (issue "runs that survive"): every wait has a deadline (``rpc_timeout_s``, through
``troupe.core.rpc``). When an engine actor dies, the group kills its handle, starts a replacement
through ``factory(i)`` (same options, same placement-group bundle), waits until it is ready, loads
the current weights into it (the source set by ``set_weights_source``; version 0, the initial
model, needs none), checks its version, and resubmits the dead engine's unfinished chunks with the
same prompts and seeds: a ``generate`` call still returns exactly one group per prompt, in order.
More than ``max_failures`` deaths in a row (no chunk completed in between) stop the run. An
exception raised inside a live engine is not retried (it would fail again): it surfaces as
``ActorFailed`` naming the engine. An engine that is alive but wedged (it has unfinished chunks and
finished none for ``stall_timeout_s``, ``cluster.engine_stall_s``) is treated as dead: killed,
replaced and its chunks resampled the same way, and it counts as one failure in a row.
"""

from __future__ import annotations

import math
import os
import socket
import time
from typing import Any, Callable, Iterable, Optional

import ray

from troupe.core.rpc import ActorFailed, get_one, wait_all
from troupe.core.types import Group, Prompt, Sampling


class EngineStalled(TimeoutError):
    """An engine with unfinished generate chunks finished none for ``stall_timeout_s`` (alive but wedged)."""

    def __init__(self, engine: int, stall_s: float) -> None:
        self.engine, self.stall_s = engine, stall_s
        super().__init__(f"engine {engine} finished no generate chunk for {stall_s:.0f} s (cluster.engine_stall_s): "
                         "wedged")


class EngineGroup:
    """The rollout engines of a run.

    Args:
        engines: Ray actor handles of ``troupe.rollout.engine.RolloutEngine``.
        chunks_per_engine: chunks each engine receives per ``generate`` call (>= 2 lets scoring
            overlap generation).
        factory: ``factory(i) -> handle`` starts a replacement for engine ``i`` (same actor options
            and placement-group bundle); None: an engine death raises ``ActorFailed``.
        rpc_timeout_s: longest wait for one remote call (``cluster.rpc_timeout_s``); also the default
            of ``stall_timeout_s``.
        max_failures: engine deaths in a row (no chunk completed in between) tolerated; one more
            raises ``RuntimeError`` (``cluster.max_engine_failures``).
        stall_timeout_s: in ``generate``, longest time an engine with unfinished chunks may go without
            finishing one before it is killed and replaced as wedged (``cluster.engine_stall_s``;
            None: ``rpc_timeout_s``). Without a factory a stall raises ``EngineStalled``.
        log: where the one line per restart goes.
    Raises:
        ValueError: no engines.
    """

    def __init__(self, engines: list, chunks_per_engine: int = 2, *, factory: Optional[Callable[[int], Any]] = None,
                 rpc_timeout_s: float = 3600.0, max_failures: int = 3, log: Callable[[str], None] = print,
                 stall_timeout_s: Optional[float] = None) -> None:
        if not engines:
            raise ValueError("EngineGroup: no engines")
        self._engines = list(engines)
        self.chunks_per_engine = chunks_per_engine
        self._factory, self.rpc_timeout_s, self.max_failures, self._log = factory, rpc_timeout_s, max_failures, log
        self.stall_timeout_s = stall_timeout_s if stall_timeout_s is not None else rpc_timeout_s
        self._restarts = 0
        self._failures_in_row = 0
        self._version = 0
        self._source: Optional[tuple[int, Callable[[Any], Any]]] = None
        self._shm: dict[int, list[str]] = {}  # engine i -> the /dev/shm segments its ready() reported (this host)

    def __len__(self) -> int:
        return len(self._engines)

    @property
    def handles(self) -> list:
        """The engine actor handles (a copy; index = engine number; replacements included)."""
        return list(self._engines)

    @property
    def restarts(self) -> int:
        """Engines replaced since the group was built (all calls)."""
        return self._restarts

    @property
    def version(self) -> int:
        """The policy version every engine holds (0: the initial model; set by the weight loads)."""
        return self._version

    def _names(self) -> list[str]:
        return [f"engine {i}" for i in range(len(self._engines))]

    # ---------------------------------------------------------------- health

    def set_weights_source(self, version: int, load: Callable[[Any], Any]) -> None:
        """How a replacement engine gets the current weights.

        Args:
            version: the policy version ``load`` brings an engine to (the one the engines just loaded).
            load: ``load(handle) -> ObjectRef`` of that engine's (last) load call (``load_weights``,
                or ``finish_weights`` after a stream of buckets); whatever it reads must stay
                available until the next call here replaces it (``WeightSync``'s strategy keeps the
                shm file / object refs).
        """
        self._source = (version, load)

    def _replace(self, i: int, err: Exception, restore: bool = True) -> None:
        """Engine ``i`` died or stalled (``err``): kill it, start a replacement, bring it to the current weights.

        ``restore=False`` skips the weights (the call about to be retried loads them itself).
        Raises:
            ActorFailed / EngineStalled: no factory (``err`` itself).
            RuntimeError: more than ``max_failures`` deaths in a row, or no weights source for the
                group's version, or the replacement reports another version.
            RemoteTimeout: the replacement did not start / load within ``rpc_timeout_s``.
        """
        if self._factory is None:
            raise err
        while True:
            self._failures_in_row += 1
            if self._failures_in_row > self.max_failures:
                raise RuntimeError(f"{self._failures_in_row} engine failures in a row (more than "
                                   f"cluster.max_engine_failures = {self.max_failures}); last: {err}; the run stops") from err
            _kill(self._engines[i])
            _unlink(self._shm.pop(i, []))
            t0 = time.time()
            self._engines[i] = self._factory(i)
            try:
                self._bring_up(i, restore)
            except ActorFailed as again:
                if not again.died:
                    raise
                err = again
                continue
            self._restarts += 1
            self._log(f"[engines] engine {i} restarted ({time.time() - t0:.1f} s, weights v{self._version}, "
                      f"restart {self._restarts}) after: {err}")
            return

    def _bring_up(self, i: int, restore: bool) -> None:
        """Wait for the replacement engine ``i``, load the current weights, check its version."""
        h, name, t = self._engines[i], f"engine {i}", self.rpc_timeout_s
        self._note_segments(i, get_one(h.ready.remote(), name, "start (replacement)", t))
        if not restore:
            return
        if self._version > 0:
            if self._source is None or self._source[0] != self._version:
                have = "none" if self._source is None else f"v{self._source[0]}"
                raise RuntimeError(f"{name} replacement: no weights source for the current version "
                                   f"v{self._version} (have {have}; EngineGroup.set_weights_source)")
            get_one(self._source[1](h), name, f"weights v{self._version} (replacement)", t)
        got = get_one(h.get_version.remote(), name, "get_version (replacement)", t)
        if got != self._version:
            raise RuntimeError(f"{name} replacement reports version {got}, the group holds v{self._version}")

    def _each(self, what: str, call: Callable[[Any], Any], restore: bool = True) -> list:
        """``call(handle)`` on every engine; each engine that died is replaced and its call retried once.

        Returns the results in engine order. Raises ``ActorFailed`` (an exception in an engine, a
        second death, or a death without factory), ``RemoteTimeout``, or ``_replace``'s errors.
        """
        refs = [call(h) for h in self._engines]
        retried: set[int] = set()
        while True:
            try:
                return wait_all(refs, self._names(), what, self.rpc_timeout_s)
            except ActorFailed as e:
                i = self._names().index(e.name)
                if not e.died or i in retried:
                    raise
                retried.add(i)
                self._replace(i, e, restore)
                refs[i] = call(self._engines[i])

    # ---------------------------------------------------------------- calls

    def ready(self) -> list[dict]:
        """Block until every engine has started; each engine's ``ready()`` facts (errors as ``_each``)."""
        facts = self._each("ready", lambda h: h.ready.remote())
        for i, f in enumerate(facts):
            self._note_segments(i, f)
        return facts

    def _note_segments(self, i: int, facts: Any) -> None:
        """Keep engine ``i``'s /dev/shm segments when it runs on this host (unlinked when it is gone)."""
        if isinstance(facts, dict) and facts.get("host") == socket.gethostname():
            self._shm[i] = list(facts.get("shm_segments", []))

    def generate(self, prompts: list[Prompt], sampling: Sampling, rewards: Optional[Any] = None,
                 seeds: Optional[list[int]] = None) -> tuple[list[Group], dict]:
        """Sample ``sampling.n`` responses per prompt on all engines, scored by ``rewards`` if given.

        Args:
            prompts: the prompts, any number.
            sampling: sampling settings (without ``seeds``: chunk c gets seed ``sampling.seed + c``
                when a seed is set).
            rewards: an object with ``submit(groups) -> ref`` and ``get(ref) -> groups``
                (``troupe.reward.pool.RewardPool``), or None to return unscored groups.
            seeds: one sampling seed per prompt (``RolloutEngine.generate``), or None. With seeds, a
                prompt's samples do not depend on the engine or chunk it lands in, nor on restarts.
        Returns:
            (groups in prompt order, one per prompt, timings {"generate": s until the last sample
            arrived, "reward": s spent waiting for scores after that, "engine_load": prompts per
            engine (first dispatch), "engine_busy": per engine, s from the call's start until its
            last chunk came back (the rest of "generate" it sat idle), "engine_restarts": engines
            replaced during this call}).
        Raises:
            ValueError: ``seeds`` and ``prompts`` differ in length.
            ActorFailed: an exception inside an engine, or an engine died and there is no factory.
            RuntimeError: more than ``max_failures`` engine deaths in a row.
            EngineStalled: an engine with unfinished chunks finished none for ``stall_timeout_s`` and
                there is no factory (with one, it is replaced as if it had died).
        """
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        t0, restarts0 = time.time(), self._restarts
        size = max(1, math.ceil(len(prompts) / (len(self._engines) * self.chunks_per_engine)))
        starts = list(range(0, len(prompts), size))
        chunks = [(prompts[s:s + size], None if seeds is None else list(seeds[s:s + size]),
                   sampling if seeds is not None or sampling.seed is None else sampling.with_(seed=sampling.seed + ci))
                  for ci, s in enumerate(starts)]
        load = [0] * len(self._engines)
        inflight: dict[Any, tuple[int, int, Any]] = {}  # ref -> (chunk, engine, handle it went to)
        for ci, chunk in enumerate(chunks):
            e = min(range(len(self._engines)), key=lambda k: load[k])
            load[e] += len(chunk[0])
            inflight[self._submit(chunk, e)] = (ci, e, self._engines[e])
        finished = [0.0] * len(self._engines)  # per engine: s from the call's start until its last chunk came back
        results = self._collect(chunks, inflight, rewards, finished, t0)
        t_gen = time.time() - t0
        out: list[Group] = []
        for ci in range(len(chunks)):
            out.extend(rewards.get(results[ci]) if rewards is not None else results[ci])
        return out, {"generate": t_gen, "reward": time.time() - t0 - t_gen, "engine_load": load,
                     "engine_busy": finished, "engine_restarts": self._restarts - restarts0}

    def _submit(self, chunk: tuple, e: int) -> Any:
        prompts, seeds, sampling = chunk
        return self._engines[e].generate.remote(prompts, sampling, seeds)

    def _collect(self, chunks: list[tuple], inflight: dict, rewards: Optional[Any], finished: list[float],
                 t0: float) -> dict[int, Any]:
        """Wait for every chunk (handing each to ``rewards`` as it arrives); replace dead engines.

        Returns {chunk index: groups, or the reward pool's ref}; ``finished[e]`` is set to the time since
        ``t0`` at which engine e's chunks came back. Errors as ``generate``.
        """
        results: dict[int, Any] = {}
        progress = [time.monotonic()] * len(self._engines)  # last time each engine finished (or got) a chunk
        stall = self.stall_timeout_s
        while inflight:
            busy = {e for _, e, _ in inflight.values()}
            left = min(progress[e] for e in busy) + stall - time.monotonic()
            if left <= 0:  # wedged engines: alive, but no chunk back for `stall` seconds
                for e in sorted(e for e in busy if progress[e] + stall <= time.monotonic()):
                    wedged = self._engines[e]
                    self._replace(e, EngineStalled(e, stall))
                    self._resubmit_unfinished(chunks, inflight, e, wedged)
                    progress[e] = time.monotonic()
                continue
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=min(left, 60.0), fetch_local=False)
            if not done:
                continue
            ci, e, handle = inflight.pop(done[0])
            try:
                groups = get_one(done[0], f"engine {e}", f"generate chunk {ci}", 0)
            except ActorFailed as err:
                if not err.died:
                    raise
                if handle is self._engines[e]:  # a fresh death (not a late error from a handle already replaced)
                    self._replace(e, err)
                    self._resubmit_unfinished(chunks, inflight, e, handle)
                inflight[self._submit(chunks[ci], e)] = (ci, e, self._engines[e])
                progress[e] = time.monotonic()
                continue
            self._failures_in_row = 0
            progress[e] = time.monotonic()
            finished[e] = time.time() - t0
            results[ci] = rewards.submit(groups) if rewards is not None else groups
        return results

    def _resubmit_unfinished(self, chunks: list[tuple], inflight: dict, e: int, dead: Any) -> None:
        """Resubmit to the replacement of engine ``e`` every chunk the ``dead`` handle left unfinished.

        A chunk the dead engine finished before it died (its ref holds a result) stays as it is.
        """
        for ref, (ci, ee, handle) in list(inflight.items()):
            if handle is dead and not ray.wait([ref], timeout=0, fetch_local=False)[0]:
                del inflight[ref]
                inflight[self._submit(chunks[ci], e)] = (ci, e, self._engines[e])

    def _check_versions(self, results: list[dict], version: int) -> list[dict]:
        got = [r["version"] for r in results]
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: engines report versions {got}, expected {version}")
        self._version = version
        return results

    def load_weights(self, path: str, version: int) -> list[dict]:
        """Every engine reloads the safetensors file at ``path`` (a path all engines can read) as ``version``.

        An engine that dies meanwhile is replaced and loads the same file. Returns each engine's
        ``{version, seconds, tensors}``. Raises ``RuntimeError`` if an engine reports another
        version afterwards; otherwise errors as ``ready``.
        """
        results = self._each(f"load_weights v{version}", lambda h: h.load_weights.remote(path, version), restore=False)
        return self._check_versions(results, version)

    def load_weight_stream(self, version: int, calls: Iterable[Callable[[Any], Any]],
                           reload: Callable[[Any], Any], timeout_s: Optional[float] = None) -> list[dict]:
        """Every engine runs a stream of weight-update calls, submitted as the stream yields them; the
        engines' result is their last call's (``RolloutEngine.finish_weights``: ``{version, ...}``).

        ``calls`` yields ``submit(handle) -> ObjectRef`` functions (begin, one per bucket, finish:
        ``troupe.cluster.weight_sync``); each is submitted to every engine at once, so the engines
        load bucket i while the caller's generator produces bucket i+1 (a Ray actor runs its calls in
        order). Once the stream is exhausted the group waits for everything. An engine that died on
        the way is replaced (``factory``) and brought to ``version`` whole by ``reload(handle) ->
        ObjectRef`` (the new version's data are complete by then). Every wait has the deadline ``timeout_s``
        (default ``rpc_timeout_s``; ``sync.timeout_s`` in a run).

        Raises:
            ActorFailed: an exception inside an engine, a replacement that dies too, a death without
                factory; RemoteTimeout; ``_replace``'s errors; RuntimeError when an engine reports
                another version afterwards.
        """
        handles = list(self._engines)
        refs: list[list[Any]] = [[] for _ in handles]
        for submit in calls:
            for e, h in enumerate(handles):
                refs[e].append(submit(h))
        what, names = f"weight sync v{version}", self._names()
        results: list[Any] = [None] * len(handles)
        retried: set[int] = set()
        pending = {e: refs[e] for e in range(len(handles))}
        while pending:
            order = [(e, k) for e in sorted(pending) for k in range(len(pending[e]))]
            try:
                done = wait_all([pending[e][k] for e, k in order], [names[e] for e, _ in order], what,
                                self.rpc_timeout_s if timeout_s is None else timeout_s,
                                key="cluster.rpc_timeout_s" if timeout_s is None else "sync.timeout_s")
            except ActorFailed as err:
                i = names.index(err.name)
                if not err.died or i in retried:
                    raise
                retried.add(i)
                self._replace(i, err, restore=False)
                pending[i] = [reload(self._engines[i])]
                continue
            for (e, k), r in zip(order, done):
                if k == len(pending[e]) - 1:
                    results[e] = r
            pending = {}
        return self._check_versions(results, version)

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[list[float]]:
        """Each engine's log-probs of ``token_ids[start:]`` given their prefix (the sync check)."""
        return self._each("sequence_logprobs", lambda h: h.sequence_logprobs.remote(token_ids, start))

    def versions(self) -> list[int]:
        """The policy version each engine samples with."""
        return self._each("get_version", lambda h: h.get_version.remote())

    def shutdown(self) -> None:
        """Kill the engine actors (dead ones included; errors ignored) and unlink the /dev/shm segments their
        vLLM processes had (``ray.kill`` stops them before vLLM can; a segment still mapped by a process
        that is exiting stays readable to it until it unmaps)."""
        for e in self._engines:
            _kill(e)
        self._engines = []
        for i in list(self._shm):
            _unlink(self._shm.pop(i))


def _unlink(paths: Iterable[str]) -> None:
    """Remove vLLM shared-memory segment files (only ``/dev/shm/psm_*``; missing ones ignored)."""
    for p in paths:
        if p.startswith("/dev/shm/psm_") and "/" not in p[len("/dev/shm/"):]:
            try:
                os.unlink(p)
            except OSError:
                pass


def _kill(handle: Any) -> None:
    """``ray.kill`` without restart, ignoring an actor that is already gone."""
    try:
        ray.kill(handle, no_restart=True)
    except Exception:
        pass
