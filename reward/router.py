"""Reward lanes: the rule functions and each reward model in actors of their own, behind one submit / get.

:class:`RewardRouter` has the reward pool's interface (``submit(groups) -> ticket``,
``get(ticket) -> groups``, ``restarts``, ``shutdown``), which is what
``troupe.rollout.engine_group.EngineGroup.generate`` uses, so the engines hand each generated chunk to
it and keep generating while it is scored. Behind it:

* the **rules lane**: one ``troupe.reward.pool.RewardPool`` with the rule functions
  (``reward.functions``; ``num_workers``, ``num_cpus_per_worker``, ``timeout_s`` per sample), which
  scores group by group;
* one **model lane** per reward model (``reward.models``): a ``RewardPool`` of ``num_workers``
  actors with ``num_cpus`` CPUs and ``num_gpus`` GPUs each, each actor holding a copy of the model.
  A model lane scores all samples of a submitted chunk in one call (so ``batch_size`` fills up
  across groups); its ``timeout_s`` is the time allowed to that call. Per-sample calls (after an
  exception in the batch call, to isolate the sample that caused it) get the same ``timeout_s``
  each, and the first timeout stops them (``troupe.reward.scoring``: ``stop_on_timeout``), so a
  hung model costs at most about twice ``timeout_s`` per chunk. Worker deaths, wedged workers
  and their replacement are the pool's (``troupe.reward.pool``), per lane; the pool's heartbeat
  default is ``max(60, 3 * timeout_s)`` of the lane.

Routing (``reward.route_by``): a group is sent to a lane only when one of the lane's parts applies
to it (``troupe.reward.scoring.route_matches`` on the group's ``prompt.columns[route_by]``; all
samples of a group share the prompt, so a group is routed as a whole and its statistics stay
within it). Inside the rules lane, :class:`troupe.reward.scoring.RewardSet` routes again per
function.

Merging the lanes' results per group: ``rewards`` summed sample by sample (None when any lane that
scored the group gave None), ``reward_parts`` the union (every part name of the config; a lane
that did not score the group gives its parts ``[None] * G``), ``failures`` the group's own counts
plus each lane's increments, ``step_rewards`` from the rules lane. A group no lane scores gets
``rewards [None] * G`` and ``failures["unrouted"] += G``. With a single lane (e.g. rule functions
only) that scores every group of a chunk, ``get`` returns that pool's result unchanged, exactly as
a lone ``RewardPool`` would.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import ray

from troupe.configs.schema import RewardConfig
from troupe.core.types import Group
from troupe.reward.pool import RewardPool
from troupe.reward.scoring import UNROUTED, RewardPart, check_reward_config, config_parts, route_matches

__all__ = ["RewardRouter", "RewardTicket"]


@dataclass
class _Lane:
    """One pool and the parts it scores. ``name``: ``"rules"`` or the model's part name."""

    name: str
    pool: RewardPool
    parts: list[RewardPart]

    def describe(self) -> str:
        if self.name == "rules":
            return "reward lane 'rules' (reward.functions)"
        p = self.parts[0]
        return f"reward lane {self.name!r} (reward.{p.key}, path {p.spec.path!r})"


@dataclass
class RewardTicket:
    """What :meth:`RewardRouter.submit` returns: the submitted groups and, per lane that got some,
    (lane, indices of its groups, the pool's ObjectRef)."""

    groups: list[Group]
    sent: list[tuple[_Lane, list[int], ray.ObjectRef]]


class RewardRouter:
    """The reward lanes of a ``RewardConfig`` (module docstring) behind a submit / get interface.

    Args:
        cfg: the run's RewardConfig.
        heartbeat_s: per lane, as ``RewardPool``'s (default: from the lane's ``timeout_s``).
        runtime_env: optional Ray runtime_env for every actor (skips the driver-side check).
        wait_ready: block until every actor of every lane has loaded its functions or model.
        max_task_retries: as ``RewardPool``'s.
        ready_timeout_s: with ``wait_ready``, the longest wait (s) for a lane's actors (None: no limit;
            runs pass ``cluster.rpc_timeout_s``).
        model_placement: ``(model name, actor slot) -> extra Ray actor options`` for a reward model's
            actors (runs place GPU reward models in their bundles of the run's placement group:
            ``troupe.cluster.runtime.reward_model_placement``); None: Ray places them.
    Raises:
        ValueError: a rule function cannot be loaded, or a model folder has no readable
            ``config.json`` (checked in the driver without loading weights; the message names
            ``reward.models.N.path``); with ``wait_ready``, anything that fails to load in a
            worker (the message names the lane, the config key and the path).
        RuntimeError: Ray is not initialized.
        TimeoutError: a lane's actors not ready within ``ready_timeout_s`` (names the lane and what to check:
            a reward model with ``num_gpus`` needs a GPU outside the engines' and learner's placement group).

    Usage (as ``RewardPool``)::

        router = RewardRouter(cfg.reward)
        ticket = router.submit(groups)      # returns at once
        scored = router.get(ticket)         # list[Group], every lane merged
        router.shutdown()
    """

    def __init__(
        self,
        cfg: RewardConfig,
        *,
        heartbeat_s: Optional[float] = -1.0,
        runtime_env: Optional[dict] = None,
        wait_ready: bool = True,
        max_task_retries: int = 1,
        ready_timeout_s: Optional[float] = None,
        model_placement: Optional[Callable[[str, int], dict]] = None,
    ) -> None:
        if not ray.is_initialized():
            raise RuntimeError("RewardRouter needs Ray: call ray.init() first")
        if runtime_env is None:  # fail fast, in the driver, naming the config's own keys
            check_reward_config(cfg)
        self._cfg = cfg
        self._parts = config_parts(cfg)
        self._names = [p.name for p in self._parts]
        self._lanes: list[_Lane] = []
        common: dict[str, Any] = dict(heartbeat_s=heartbeat_s, runtime_env=runtime_env, wait_ready=False,
                                      max_task_retries=max_task_retries)
        try:
            rules = [p for p in self._parts if not p.is_model]
            if rules:
                self._lanes.append(_Lane("rules", RewardPool(cfg.model_copy(update={"models": []}), **common), rules))
            for p in self._parts:
                if p.is_model:
                    place = (lambda slot, name=p.name: model_placement(name, slot)) if model_placement else None
                    self._lanes.append(_Lane(p.name, RewardPool(self._model_cfg(p), num_gpus_per_worker=p.spec.num_gpus,
                                                                name=f"reward-model-{p.name}", placement=place,
                                                                **common), [p]))
            if wait_ready:
                self.wait_ready(ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _model_cfg(self, p: RewardPart) -> RewardConfig:
        """The lane config of reward model part ``p``: no rule functions, its own actors and timeout;
        a path that exists here made absolute (actors may start in another working directory)."""
        m = p.spec
        if os.path.exists(m.path):
            m = m.model_copy(update={"path": os.path.abspath(m.path)})
        return self._cfg.model_copy(update=dict(functions=[], models=[m], num_workers=m.num_workers,
                                                num_cpus_per_worker=m.num_cpus, timeout_s=m.timeout_s))

    def wait_ready(self, timeout: Optional[float] = None) -> None:
        """Block until every lane's workers have loaded their functions or model.

        Raises:
            ValueError: a worker could not load (names the lane, its config key and path).
            TimeoutError: not ready within ``timeout`` seconds (per lane; names the lane).
        """
        for lane in self._lanes:
            try:
                lane.pool.wait_ready(timeout)
            except ValueError as e:
                raise ValueError(f"{lane.describe()}: {e}") from e
            except ray.exceptions.GetTimeoutError as e:
                raise TimeoutError(
                    f"{lane.describe()}: its actors were not ready after {timeout:.0f} s (cluster.rpc_timeout_s). "
                    "They may not fit the cluster: a reward model with num_gpus needs a GPU left over by the "
                    "engines' and learner's placement group (`ray status` shows what is free)") from e

    # ---------------------------------------------------------------- facts

    @property
    def lanes(self) -> dict[str, RewardPool]:
        """Lane name (``"rules"`` or a model's part name) -> its pool."""
        return {lane.name: lane.pool for lane in self._lanes}

    @property
    def names(self) -> list[str]:
        """Every part name (rule functions, then models), as in ``Group.reward_parts``."""
        return list(self._names)

    @property
    def num_workers(self) -> int:
        """Worker actors over all lanes."""
        return sum(lane.pool.num_workers for lane in self._lanes)

    @property
    def workers(self) -> list[Any]:
        """Every lane's worker actor handles, lane by lane."""
        return [w for lane in self._lanes for w in lane.pool.workers]

    @property
    def restarts(self) -> int:
        """Workers replaced over all lanes (dead or wedged; ``troupe.reward.pool``)."""
        return sum(lane.pool.restarts for lane in self._lanes)

    # ---------------------------------------------------------------- reward-model weights

    def _model_lane(self, name: str) -> _Lane:
        lane = next((lane for lane in self._lanes if lane.name == name and lane.name != "rules"), None)
        if lane is None:
            raise ValueError(f"no reward-model lane {name!r} (model lanes: "
                             f"{[lane.name for lane in self._lanes if lane.name != 'rules']})")
        return lane

    def refresh_model(self, name: str, path: str, version: int, timeout: Optional[float] = None) -> list[int]:
        """Every actor of reward model ``name``'s lane scores with the folder ``path`` as ``version`` from
        its next batch on (iterative RL, ``troupe.cluster.iterative``); call it between steps.

        Waits for every actor (``RewardPool.reload_model``: a dead one is replaced, and actors started
        later, after a death, load ``path`` too).

        Args:
            name: the model's part name (``reward.models.N.name``).
            path: the new reward-model folder (absolute, or relative to the working directory).
            version: its version (0 is the configured folder).
            timeout: seconds to wait for all the lane's actors (None: as long as it takes).
        Returns:
            Each actor's version afterwards, in worker-slot order.
        Raises:
            ValueError: no such model lane, or an actor cannot load the folder (names the lane).
            ray.exceptions.GetTimeoutError: not done within ``timeout``.
        """
        lane = self._model_lane(name)
        path = os.path.abspath(path)
        p = lane.parts[0]
        try:
            versions = lane.pool.reload_model(name, path, version, timeout)
        except ValueError as e:
            raise ValueError(f"{lane.describe()}: {e}") from e
        lane.parts[0] = p._replace(spec=p.spec.model_copy(update={"path": path}))
        return versions

    def model_versions(self, name: str, timeout: Optional[float] = None) -> list[int]:
        """The version every actor of reward model ``name``'s lane scores with, in worker-slot order."""
        workers = self._model_lane(name).pool.workers
        return [v[name] for v in ray.get([w.model_versions.remote() for w in workers], timeout=timeout)]

    # ---------------------------------------------------------------- scoring

    def _route_value(self, g: Group) -> Any:
        return g.prompt.columns.get(self._cfg.route_by) if self._cfg.route_by else None

    def submit(self, groups: Sequence[Group]) -> RewardTicket:
        """Send each lane the groups it has a part for; returns at once.

        Args:
            groups: groups to score (sent by value; the caller's objects are not modified).
        Returns:
            A :class:`RewardTicket` for :meth:`get`.
        """
        groups = list(groups)
        values = [self._route_value(g) for g in groups]
        sent = []
        for lane in self._lanes:
            idx = [k for k, v in enumerate(values) if any(route_matches(p.tasks, v) for p in lane.parts)]
            if idx:
                sent.append((lane, idx, lane.pool.submit([groups[k] for k in idx])))
        return RewardTicket(groups, sent)

    def get(
        self, tickets: Union[RewardTicket, Sequence[RewardTicket]], timeout: Optional[float] = None
    ) -> Union[list[Group], list[list[Group]]]:
        """Wait for every lane of a ticket and merge their scores per group (module docstring).

        Args:
            tickets: one ticket from :meth:`submit` (returns ``list[Group]``, in submit order) or
                a sequence of them (returns ``list[list[Group]]``).
            timeout: seconds per lane (None: as long as it takes).
        Raises:
            ray.exceptions.GetTimeoutError: ``timeout`` passed.
        """
        if isinstance(tickets, RewardTicket):
            return self._get_one(tickets, timeout)
        return [self._get_one(t, timeout) for t in tickets]

    def score_now(self, groups: Sequence[Group], timeout: Optional[float] = None) -> list[Group]:
        """``get(submit(groups))``."""
        return self._get_one(self.submit(groups), timeout)

    def _get_one(self, ticket: RewardTicket, timeout: Optional[float]) -> list[Group]:
        if len(self._lanes) == 1 and len(ticket.sent) == 1 and len(ticket.sent[0][1]) == len(ticket.groups):
            lane, _, ref = ticket.sent[0]
            return lane.pool.get(ref, timeout)  # the only lane scored everything: its result as is
        scored: list[list[tuple[_Lane, Group]]] = [[] for _ in ticket.groups]
        for lane, idx, ref in ticket.sent:
            for k, g in zip(idx, lane.pool.get(ref, timeout)):
                scored[k].append((lane, g))
        return [self._merge(g, s) for g, s in zip(ticket.groups, scored)]

    def _merge(self, original: Group, scored: list[tuple[_Lane, Group]]) -> Group:
        """One group from its lanes' scored copies (module docstring)."""
        n = len(original.samples)
        parts: dict[str, list[Optional[float]]] = {name: [None] * n for name in self._names}
        failures = dict(original.failures)
        if not scored:
            failures[UNROUTED] = failures.get(UNROUTED, 0) + n
            has_process = any(not p.is_model and p.spec.kind == "process" for p in self._parts)
            return dataclasses.replace(original, rewards=[None] * n, reward_parts=parts, failures=failures,
                                       step_rewards=[None] * n if has_process else [])
        rewards: list[Optional[float]] = list(scored[0][1].rewards)
        for _, g in scored[1:]:
            rewards = [None if a is None or b is None else a + b for a, b in zip(rewards, g.rewards)]
        step_rewards: list = []
        for lane, g in scored:
            parts.update(g.reward_parts)
            for key, count in g.failures.items():
                inc = count - original.failures.get(key, 0)
                if inc:
                    failures[key] = failures.get(key, 0) + inc
            if lane.name == "rules":
                step_rewards = g.step_rewards
        return dataclasses.replace(scored[0][1], rewards=rewards, reward_parts=parts, failures=failures,
                                   step_rewards=step_rewards)

    def shutdown(self) -> None:
        """Kill every lane's actors."""
        for lane in self._lanes:
            lane.pool.shutdown()

    def __repr__(self) -> str:
        lanes = ", ".join(f"{lane.name}: {lane.pool.num_workers}" for lane in self._lanes)
        return f"RewardRouter(lanes={{{lanes}}}, restarts={self.restarts})"
