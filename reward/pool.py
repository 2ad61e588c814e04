"""Reward workers: Ray actors that score groups while the engines keep generating.

``RewardWorker`` is a plain class (usable without Ray, e.g. in tests); ``RewardPool`` wraps it
with ``ray.remote`` and starts ``cfg.num_workers`` actors. ``RewardPool.submit`` returns an
``ObjectRef`` at once, so the training loop can hand a batch of groups to the pool and go
back to generation; ``RewardPool.get`` collects the scored groups later. One pool runs one kind
of scoring; ``troupe.reward.router.RewardRouter`` puts the rule functions and each reward model
in a pool of their own (lanes) behind the same interface.

What a worker scores at once: with rule functions only, each group is one
``RewardSet.score`` call (its G samples; a function's batch timeout and per-sample fallback
stay within the group). A worker holding a reward model (``cfg.models``) scores all samples of
all groups of a submitted batch in one call, so the model's ``batch_size`` fills up across
groups; the result is split back per group (``ScoreResult.select``). Every function gets
``prompt_texts`` (each group's ``prompt.text``, the templated prompt the policy saw).

Fault tolerance, in three layers:

1. Ray: actors are created with ``max_restarts=-1, max_task_retries=1``. If a worker
   process dies mid-batch (segfault in a C extension, ``os._exit``, OOM kill), Ray restarts
   it and re-runs the batch once on the new process; the first batch a restarted worker
   scores carries ``failures["worker_restart"] = 1`` on its first group.
2. Pool, dead worker: if ``get`` sees ``ray.exceptions.RayActorError`` (the batch killed the
   restarted process too, the actor was killed with ``no_restart``, or its node is gone), the
   pool replaces the actor, resubmits the batch once and counts ``failures["worker_restart"]``
   on its first group. If the batch kills that worker as well (a reward function that crashes
   the process on some input, every time), its groups are scored one per task: the others get
   their scores, and a group that kills the worker again is returned scored as failed: every
   applicable part of every sample counts as ``"exception"`` (reward 0 or None by ``on_failure``) and the
   group carries ``failures["worker_died"] = 1``. The run goes on.
3. Pool, wedged worker: per-call timeouts in ``troupe.reward.scoring`` are thread-based,
   and a thread stuck in C code that holds the GIL (a huge integer power, a catastrophic
   regex) stops the whole process, timeouts included. While waiting, ``get`` pings the
   worker (``ping`` runs in its own actor thread, so it answers whenever the interpreter
   runs); no answer within ``heartbeat_s`` means the process is wedged: the pool kills and
   replaces it and resubmits the batch once (``failures["worker_restart"]``). If the batch
   wedges its second worker too, it is returned scored as failed: every applicable part of every
   sample counts as ``"timeout"`` (reward 0 or None by ``on_failure``) and the first group
   carries ``failures["worker_wedged"] = 1``.

A group that kills its worker is thus tried at most six times (twice in its batch on the first
actor and on its replacement, twice alone) before it is scored as failed.
``max_task_retries=-1`` (Ray's unlimited retries) would instead retry such a batch forever.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Optional, Sequence, Union

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from troupe.configs.schema import RewardConfig
from troupe.core.rpc import start_named
from troupe.core.steps import step_texts
from troupe.core.threads import threads_for_cpus, with_thread_env
from troupe.core.types import Group
from troupe.reward.scoring import (
    UNROUTED,
    RewardSet,
    ScoreResult,
    check_reward_config,
    column_names,
    config_parts,
    reward_columns,
    route_matches,
)

__all__ = ["RewardPool", "RewardWorker"]

logger = logging.getLogger(__name__)

_HEALTH_GROUP = "health"
_STARTUP_TIMEOUT_S = 300.0


class RewardWorker:
    """Scores groups with the configured reward functions (one per Ray actor, or in-process).

    Args:
        cfg: the run's RewardConfig; its functions and models are loaded here (a
            :class:`troupe.reward.scoring.RewardSet`, in the worker process, so plugin modules
            must be importable there and model folders readable).
        versions: reward-model name -> the version of the weights its ``path`` holds (iterative RL,
            :meth:`reload_model`); default 0 for every model (the configured folder).
    Raises:
        ValueError: a spec or model cannot be loaded (message names it).
    """

    def __init__(self, cfg: RewardConfig, versions: Optional[dict[str, int]] = None) -> None:
        self._cfg = cfg
        self._versions = {m.name: int((versions or {}).get(m.name, 0)) for m in cfg.models}
        self._rewards = RewardSet(cfg)
        self._whole_batch = bool(self._rewards.models)  # reward models: one call over all groups
        self._restarted = False
        try:
            if ray.is_initialized():
                ctx = ray.get_runtime_context()
                self._restarted = bool(ctx.get_actor_id()) and bool(ctx.was_current_actor_reconstructed)
        except Exception:  # noqa: BLE001 - not in an actor
            self._restarted = False

    @ray.method(concurrency_group=_HEALTH_GROUP)
    def ping(self) -> list[str]:
        """The part names this worker scores (proves the functions loaded and the process runs).

        Runs in its own actor thread (concurrency group ``health``), so it answers while
        ``score`` is busy, unless the interpreter itself is blocked.
        """
        return list(self._rewards.names)

    def model_versions(self) -> dict[str, int]:
        """Reward-model name -> the version of the weights this worker scores with (0: the configured
        folder). Runs between ``score`` calls, so it reports what the next batch is scored with."""
        return dict(self._versions)

    def reload_model(self, name: str, path: str, version: int) -> int:
        """Score with reward model ``name`` loaded from ``path`` as ``version`` from the next batch on.

        Iterative RL (``troupe.cluster.iterative``). Runs between ``score`` calls (the same actor
        thread), so no batch mixes two versions. The new folder is loaded before the old model is let
        go: a folder that fails to load leaves the worker as it was. A version the worker already
        holds is not loaded again.

        Returns:
            ``version``.
        Raises:
            ValueError: ``name`` is not a reward model of this worker, or the folder cannot be
                loaded (names it).
        """
        if name not in self._versions:
            raise ValueError(f"reload_model: {name!r} is not a reward model of this worker ({sorted(self._versions)})")
        if self._versions[name] == version:
            return version
        cfg = _with_model_path(self._cfg, name, path)
        self._rewards, self._cfg = RewardSet(cfg), cfg
        self._versions[name] = int(version)
        return int(version)

    def score(self, groups: list[Group], models: Optional[dict[str, tuple[str, int]]] = None) -> list[Group]:
        """Score every sample of every group and return the groups filled in.

        Each group is scored as one batch (``RewardSet.score``; its samples share the prompt and
        reference), or, when this worker holds a reward model, all groups together (module
        docstring). Reward functions receive ``prompts`` (``prompt.question``), ``prompt_texts``
        (``prompt.text``), ``completions`` (``sample.text``), ``answer`` (``prompt.answer``) and
        every key of ``prompt.columns`` present in any group of the batch (None where a group
        lacks it; keys named ``answer`` or in ``troupe.reward.scoring.RESERVED_KEYWORDS`` are
        skipped).

        Sets on each group: ``rewards`` ([G] combined reward or None), ``reward_parts``
        (name -> [G]), ``step_rewards`` (process functions only: [G] per-step lists, the
        completions cut by ``step_texts``), and adds to ``failures``: counts per cause
        (``exception``, ``timeout``, ``nan``, ``type``; per function-sample pair), ``none``
        (function returned None: not a failure, the sample is left out of group statistics),
        ``unrouted`` (per-row routing: samples no function applies to) and ``worker_restart``.

        Args:
            groups: groups with samples.
            models: reward-model name -> (path, version) the pool expects the batch to be scored with;
                a worker holding another version loads it first (:meth:`reload_model`): that is how a
                worker Ray restarted with its first arguments catches up after a refresh.
        Returns:
            The same groups (in order), scored.
        """
        for name, (path, version) in (models or {}).items():
            self.reload_model(name, path, version)
        keys = column_names(g.prompt.columns for g in groups)
        if self._whole_batch and groups:
            sizes = [len(g.samples) for g in groups]
            columns = reward_columns([g.prompt.answer for g, n in zip(groups, sizes) for _ in range(n)],
                                     [g.prompt.columns for g, n in zip(groups, sizes) for _ in range(n)], keys)
            res = self._rewards.score(
                [g.prompt.question for g, n in zip(groups, sizes) for _ in range(n)],
                [s.text for g in groups for s in g.samples], columns,
                prompt_texts=[g.prompt.text for g, n in zip(groups, sizes) for _ in range(n)])
            _log_messages(res)
            start = 0
            for g, n in zip(groups, sizes):
                _fill_group(g, res.select(start, start + n), log=False)
                start += n
        else:
            for g in groups:
                n = len(g.samples)
                columns = reward_columns([g.prompt.answer] * n, [g.prompt.columns] * n, keys)
                res = self._rewards.score([g.prompt.question] * n, [s.text for s in g.samples], columns,
                                          prompt_texts=[g.prompt.text] * n)
                _fill_group(g, res)
        if self._restarted and groups:
            groups[0].failures["worker_restart"] = groups[0].failures.get("worker_restart", 0) + 1
            self._restarted = False
        return groups


def _with_model_path(cfg: RewardConfig, name: str, path: str) -> RewardConfig:
    """``cfg`` with reward model ``name`` read from ``path``."""
    return cfg.model_copy(update={"models": [m.model_copy(update={"path": path}) if m.name == name else m
                                             for m in cfg.models]})


def _fill_group(g: Group, res: ScoreResult, log: bool = True) -> None:
    """Copy one group's ScoreResult into it: rewards, parts, step rewards, failure counts."""
    g.rewards = res.rewards
    g.reward_parts = res.parts
    g.step_rewards = res.step_rewards
    counts = dict(res.failures)
    if res.none_count:
        counts["none"] = res.none_count
    for k, v in counts.items():
        g.failures[k] = g.failures.get(k, 0) + v
    if log:
        _log_messages(res)


def _log_messages(res: ScoreResult) -> None:
    for name, msg in res.messages.items():
        logger.warning("reward %s: %s", name, msg)


class _Wedged(Exception):
    pass


class RewardPool:
    """``cfg.num_workers`` reward-worker actors behind a submit / get interface.

    Args:
        cfg: the run's RewardConfig (functions, models, route_by, timeout_s, on_failure,
            num_workers); every worker loads all of its functions and models.
        num_cpus_per_worker: Ray CPUs per actor; default ``cfg.num_cpus_per_worker``.
        num_gpus_per_worker: Ray GPUs per actor (a reward model on GPU; default 0).
        max_task_retries: Ray task retries on worker death (-1: unlimited, which retries a batch
            that always kills its worker forever; see module doc).
        heartbeat_s: seconds a busy worker may leave a ping unanswered before it counts as
            wedged (layer 3); default ``max(60, 3 * cfg.timeout_s)``; None disables the check.
        runtime_env: optional Ray runtime_env for the actors (e.g. PYTHONPATH for plugins). Every actor's
            gets ``troupe.core.threads.cpu_thread_env(floor(CPUs per actor), at least 1)`` added: thread
            variables from its CPUs, not the shell's (variables set here win).
        wait_ready: block until every actor has loaded its functions (load errors surface
            here instead of at the first ``get``).
        name: the actors' name prefix in the Ray dashboard (``{name}-{slot}``).
        placement: ``slot -> extra Ray actor options`` for the actor of ``slot`` and its replacements
            (e.g. a placement-group bundle); None: Ray places them.
    Raises:
        ValueError: a reward spec cannot be loaded or a model folder has no readable config.json
            (checked cheaply in the driver first unless a ``runtime_env`` is given,
            ``troupe.reward.scoring.check_reward_config``: no model weights are loaded there),
            then anything that fails to load in the workers when ``wait_ready``.
        RuntimeError: Ray is not initialized.

    Usage from the training loop::

        pool = RewardPool(cfg.reward)
        ref = pool.submit(groups)          # returns at once; keep generating
        ...
        scored = pool.get(ref)             # list[Group] with rewards filled in
        pool.shutdown()
    """

    def __init__(
        self,
        cfg: RewardConfig,
        num_cpus_per_worker: Optional[float] = None,
        *,
        num_gpus_per_worker: float = 0.0,
        max_task_retries: int = 1,
        heartbeat_s: Optional[float] = -1.0,
        runtime_env: Optional[dict] = None,
        wait_ready: bool = True,
        name: str = "reward-worker",
        placement: Optional[Callable[[int], dict]] = None,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RewardPool needs Ray: call ray.init() first")
        if runtime_env is None:  # fail fast, in the driver, with the loader's message
            check_reward_config(cfg)
        self._cfg = cfg
        self._models: dict[str, tuple[str, int]] = {}  # reward-model name -> (path, version) after reload_model
        self._parts = config_parts(cfg)
        self._names = [p.name for p in self._parts]
        self._has_process = any(f.kind == "process" for f in cfg.functions)
        self._on_failure = cfg.on_failure
        self._heartbeat_s = max(60.0, 3.0 * cfg.timeout_s) if heartbeat_s is not None and heartbeat_s < 0 else heartbeat_s
        cpus = cfg.num_cpus_per_worker if num_cpus_per_worker is None else num_cpus_per_worker
        options: dict[str, Any] = dict(
            num_cpus=cpus,
            num_gpus=num_gpus_per_worker,
            max_restarts=-1,
            max_task_retries=max_task_retries,
            concurrency_groups={_HEALTH_GROUP: 1},
        )
        # the actors' thread variables from their CPUs, not from the shell (troupe.core.threads)
        options["runtime_env"] = with_thread_env(runtime_env, threads_for_cpus(cpus))
        self._actor_cls = ray.remote(**options)(RewardWorker)
        self._name = name
        self._placement = placement
        self._workers = [self._new_worker(i) for i in range(cfg.num_workers)]
        self._inflight: list[list[ray.ObjectRef]] = [[] for _ in self._workers]
        # ref -> (worker slot, actor handle it went to, the groups), for resubmission
        self._origin: dict[ray.ObjectRef, tuple[int, Any, list[Group]]] = {}
        self._restarts = 0
        if wait_ready:
            self.wait_ready()

    def _new_worker(self, slot: int) -> Any:
        """A worker actor for ``slot``, named ``{name}-{slot}`` in the Ray dashboard."""
        return start_named(self._actor_cls, f"{self._name}-{slot}",
                           (self._cfg, {name: v for name, (_, v) in self._models.items()}),
                           **(self._placement(slot) if self._placement else {}))

    @property
    def num_workers(self) -> int:
        """How many worker actors the pool runs."""
        return len(self._workers)

    @property
    def workers(self) -> list[Any]:
        """The worker actor handles (a copy of the list; index = worker slot)."""
        return list(self._workers)

    @property
    def restarts(self) -> int:
        """Workers the pool replaced (dead or wedged; layers 2 and 3 in the module docstring)."""
        return self._restarts

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until every worker has loaded its reward functions.

        Raises:
            ValueError: a worker could not load a function (the loader's message).
            ray.exceptions.GetTimeoutError: not ready within ``timeout`` seconds.
        """
        try:
            ray.get([w.ping.remote() for w in self._workers], timeout=timeout)
        except RayActorError as e:
            text = str(e)  # Ray's message ends with the constructor's traceback: lead with its last line
            last = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
            raise ValueError(f"reward workers failed to start: {last}\n{text}") from e

    def _pick(self) -> int:
        for i, refs in enumerate(self._inflight):
            if refs:
                _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
                self._inflight[i] = list(pending)
        return min(range(len(self._workers)), key=lambda i: len(self._inflight[i]))

    def _send(self, idx: int, groups: list[Group]) -> ray.ObjectRef:
        ref = self._workers[idx].score.remote(groups, self._models or None)
        self._inflight[idx].append(ref)
        return ref

    def submit(self, groups: list[Group]) -> ray.ObjectRef:
        """Send a batch of groups to the least-loaded worker; returns at once.

        Args:
            groups: groups to score (sent by value; the caller's objects are not modified).
        Returns:
            An ObjectRef of ``list[Group]`` (scored copies). ``ray.get(ref)`` works;
            ``pool.get(ref)`` also recovers from dead or wedged workers (layers 2 and 3).
        """
        idx = self._pick()
        groups = list(groups)
        ref = self._send(idx, groups)
        self._origin[ref] = (idx, self._workers[idx], groups)
        return ref

    def submit_split(self, groups: list[Group], parts: Optional[int] = None) -> list[ray.ObjectRef]:
        """Split groups into ``parts`` contiguous chunks (default: one per worker) and submit each.

        Returns:
            One ObjectRef per non-empty chunk, in order; ``pool.get(refs)`` returns a list of
            lists, ``pool.get_flat(refs)`` the concatenation.
        """
        k = max(1, min(parts or len(self._workers), len(groups)))
        size, rem = divmod(len(groups), k)
        refs, start = [], 0
        for i in range(k):
            end = start + size + (1 if i < rem else 0)
            if end > start:
                refs.append(self.submit(groups[start:end]))
            start = end
        return refs

    def reload_model(self, name: str, path: str, version: int, timeout: Optional[float] = None) -> list[int]:
        """Every worker scores with reward model ``name`` from ``path`` as ``version`` from its next batch on.

        The pool keeps (path, version): workers it starts later (replacements) load that folder, and
        every batch it sends carries it, so a worker Ray restarted with its first arguments loads it
        before scoring (``RewardWorker.score``). A worker found dead here is replaced.

        Args:
            name: the reward model's name (``reward.models.N.name``).
            path: the new model folder (readable by every worker).
            version: its version (ints; 0 is the configured folder).
            timeout: seconds to wait for all workers (None: as long as it takes).
        Returns:
            Each worker's version afterwards, in worker-slot order.
        Raises:
            ValueError: ``name`` is not a model of this pool, or a worker cannot load the folder.
            ray.exceptions.GetTimeoutError: not done within ``timeout``.
        """
        if name not in {m.name for m in self._cfg.models}:
            raise ValueError(f"reload_model: {name!r} is not a reward model of this pool "
                             f"({[m.name for m in self._cfg.models]})")
        self._cfg = _with_model_path(self._cfg, name, path)
        self._models[name] = (path, int(version))
        deadline = None if timeout is None else time.monotonic() + timeout
        sent = [(i, w, w.reload_model.remote(name, path, version)) for i, w in enumerate(self._workers)]
        out = []
        for i, actor, ref in sent:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                out.append(ray.get(ref, timeout=left))
            except RayActorError:
                self._replace_worker(i, actor)  # the replacement starts from the new folder
                out.append(ray.get(self._workers[i].model_versions.remote(), timeout=left)[name])
            except RayTaskError as e:
                raise ValueError(f"reward model {name!r}: a worker could not load {path!r}: {e}") from e
        return out

    def _replace_worker(self, idx: int, actor: Any) -> None:
        """Kill ``actor`` and put a fresh worker in slot ``idx`` (unless another batch's
        recovery already replaced it)."""
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
        if self._workers[idx] is actor:
            new = self._new_worker(idx)
            # Wait until it runs, so that its start-up is not mistaken for a wedged process.
            ray.get(new.ping.remote(), timeout=_STARTUP_TIMEOUT_S)
            self._workers[idx] = new
            self._inflight[idx] = []
            self._restarts += 1

    def _wait(self, ref: ray.ObjectRef, worker: Any, deadline: Optional[float]) -> list[Group]:
        """ray.get with heartbeats to ``worker``; raises _Wedged, RayActorError or GetTimeoutError."""
        while True:
            step = self._heartbeat_s
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise GetTimeoutError(f"reward batch not scored within the timeout ({ref})")
                step = left if step is None else min(step, left)
            ready, _ = ray.wait([ref], timeout=step)
            if ready:
                return ray.get(ref)
            if self._heartbeat_s is None or (deadline is not None and time.monotonic() >= deadline):
                continue
            try:
                ray.get(worker.ping.remote(), timeout=self._heartbeat_s)
            except GetTimeoutError:
                ready, _ = ray.wait([ref], timeout=0)
                if ready:
                    return ray.get(ref)
                raise _Wedged(f"reward worker did not answer a ping within {self._heartbeat_s} s") from None
            except RayActorError:
                pass  # the actor is restarting or gone; the next ray.get(ref) tells which

    def _applicable(self, g: Group) -> list[str]:
        """The part names that score group ``g`` (per-row routing by ``cfg.route_by``)."""
        value = g.prompt.columns.get(self._cfg.route_by) if self._cfg.route_by else None
        return [p.name for p in self._parts if route_matches(p.tasks, value)]

    def _failed_batch(self, groups: list[Group], cause: str, flag: str) -> list[Group]:
        """Copies of ``groups`` with every applicable part of every sample failed with ``cause``
        (a group no part applies to: ``unrouted``), and ``failures[flag] = 1`` on the first (the
        caller's objects stay untouched)."""
        out = []
        for g in groups:
            n, applicable = len(g.samples), self._applicable(g)
            failures = dict(g.failures)
            if applicable:
                failures[cause] = failures.get(cause, 0) + n * len(applicable)
            else:
                failures[UNROUTED] = failures.get(UNROUTED, 0) + n
            out.append(
                dataclasses.replace(
                    g,
                    rewards=[0.0 if self._on_failure == "zero" and applicable else None] * n,
                    reward_parts={name: [None] * n for name in self._names},
                    failures=failures,
                    step_rewards=self._failed_steps(g) if self._has_process else [],
                )
            )
        if out:
            out[0].failures[flag] = out[0].failures.get(flag, 0) + 1
        return out

    def _one_group_at_a_time(self, idx: int, groups: list[Group], deadline: Optional[float]) -> list[Group]:
        """Score ``groups`` one group per task on slot ``idx``, so that only a group that kills
        (or wedges) the worker is scored as failed; each such group costs a worker replacement."""
        out: list[Group] = []
        for g in groups:
            actor = self._workers[idx]
            try:
                out += self._wait(self._send(idx, [g]), actor, deadline)
            except (RayActorError, _Wedged) as e:
                self._replace_worker(idx, actor)
                wedged = isinstance(e, _Wedged)
                cause, flag = ("timeout", "worker_wedged") if wedged else ("exception", "worker_died")
                out += self._failed_batch([g], cause, flag)
        return out

    def _failed_steps(self, g: Group) -> list[Optional[list[float]]]:
        if self._on_failure == "exclude" or not self._applicable(g):
            return [None] * len(g.samples)
        return [[0.0] * len(step_texts(smp.text, self._cfg.step_delimiter)) for smp in g.samples]

    def _get_one(self, ref: ray.ObjectRef, timeout: Optional[float]) -> list[Group]:
        deadline = None if timeout is None else time.monotonic() + timeout
        origin = self._origin.get(ref)
        if origin is None:  # not submitted through this pool (or already collected)
            return ray.get(ref, timeout=timeout)
        idx, actor, groups = origin
        try:
            out = self._wait(ref, actor, deadline)
        except (RayActorError, _Wedged) as e:
            wedged = isinstance(e, _Wedged)
            logger.warning(
                "reward worker %d %s (%s); replacing it and resubmitting %d groups",
                idx, "is wedged" if wedged else "died", e, len(groups),
            )
            self._origin.pop(ref, None)
            retry_actor = actor
            try:
                self._replace_worker(idx, actor)
                retry_actor = self._workers[idx]
                retry = self._send(idx, groups)
                out = self._wait(retry, retry_actor, deadline)
            except _Wedged:
                logger.error("reward batch of %d groups wedged two workers; scoring it as failed", len(groups))
                self._replace_worker(idx, retry_actor)
                return self._failed_batch(groups, "timeout", "worker_wedged")
            except RayActorError as e2:
                logger.error("reward batch of %d groups killed its worker again (%s): a reward function may be "
                             "crashing the worker process; scoring its groups one by one", len(groups), e2)
                self._replace_worker(idx, retry_actor)
                return self._one_group_at_a_time(idx, groups, deadline)
            if out:
                out[0].failures["worker_restart"] = out[0].failures.get("worker_restart", 0) + 1
            return out
        self._origin.pop(ref, None)
        return out

    def get(
        self, refs: Union[ray.ObjectRef, Sequence[ray.ObjectRef]], timeout: Optional[float] = None
    ) -> Union[list[Group], list[list[Group]]]:
        """Wait for scored groups.

        Args:
            refs: one ObjectRef from :meth:`submit` (returns ``list[Group]``) or a sequence of
                them (returns ``list[list[Group]]``, same order).
            timeout: seconds per ref (None: wait as long as it takes).
        Raises:
            ray.exceptions.GetTimeoutError: ``timeout`` passed.
        """
        if isinstance(refs, ray.ObjectRef):
            return self._get_one(refs, timeout)
        return [self._get_one(r, timeout) for r in refs]

    def get_flat(self, refs: Sequence[ray.ObjectRef], timeout: Optional[float] = None) -> list[Group]:
        """:meth:`get` on several refs, concatenated in order."""
        return [g for batch in self.get(list(refs), timeout) for g in batch]

    def score_now(self, groups: list[Group], timeout: Optional[float] = None) -> list[Group]:
        """Score groups across all workers and wait: ``get_flat(submit_split(groups))``."""
        if not groups:
            return []
        return self.get_flat(self.submit_split(groups), timeout)

    def shutdown(self) -> None:
        """Kill the worker actors (pending refs then fail with RayActorError)."""
        for w in self._workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._workers = []
        self._inflight = []
        self._origin.clear()

    def __repr__(self) -> str:
        return f"RewardPool(workers={len(self._workers)}, functions={self._names}, restarts={self._restarts})"
