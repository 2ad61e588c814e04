"""Start Ray and place every actor explicitly: engines, learner ranks, reward workers.

Engines and learner ranks get one bundle each in a single placement group (PACK), so their
CPUs/GPUs are reserved before anything starts and a run that cannot fit fails at once with
the resources it asked for. Reward workers with ``num_cpus_per_worker = 0`` float freely.
Reward-model actors (``reward.models``, ``troupe.reward.router``) are placed by Ray with their own
``num_cpus``/``num_gpus`` (one GPU each on GPU clusters), outside the placement group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from troupe.cluster.learners import LearnerGroup
from troupe.configs.schema import LearnerConfig, RunConfig
from troupe.core.rpc import start_named
from troupe.core.threads import cpu_thread_env, overridden, threads_for_cpus
from troupe.learner.critic_rank import CriticRank
from troupe.learner.zero import LearnerRank
from troupe.reward.router import RewardRouter
from troupe.rollout.engine import RolloutEngine
from troupe.rollout.engine_group import EngineGroup


def init_ray(cfg: RunConfig, address: str | None, dashboard: bool = False) -> None:
    """Join a Ray cluster, or start an embedded local cluster sized for the run (:func:`join_ray`)."""
    need = cfg.rollout.num_engines * cfg.rollout.num_cpus_per_engine + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank \
        + cfg.reward.num_workers * cfg.reward.num_cpus_per_worker \
        + sum(m.num_workers * m.num_cpus for m in cfg.reward.models) \
        + (cfg.reward.iterative.num_cpus if cfg.reward.iterative else 0) \
        + (cfg.critic.num_ranks * cfg.critic.num_cpus_per_rank if cfg.critic else 0)
    join_ray(address or cfg.cluster.address, need, dashboard)


def join_ray(address: str | None, need_cpus: float, dashboard: bool = False) -> None:
    """Join a Ray cluster, or start an embedded local cluster with at least ``need_cpus`` CPUs.

    The cluster is the first of: ``address`` (``--address``, else the config's ``cluster.address``),
    RAY_ADDRESS (set by Ray inside a ``ray job submit`` driver); with none of them (or "local") a
    fresh local cluster, whatever address file an earlier ``ray start`` left behind.
    ``dashboard`` starts the Ray dashboard (http://127.0.0.1:8265) with the local cluster.
    Raises ``ConnectionError`` if the cluster cannot be joined (with a hint about token auth).
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address and address != "local":
        try:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        except ConnectionError as e:
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
                raise
            # Ray 2.60 turns token auth on at `ray start` when a token exists (~/.ray/auth_token, which any
            # local ray.init creates); a client without RAY_AUTH_MODE=token then fails with this bare message
            raise ConnectionError(f"{e}. If the cluster uses token authentication, set RAY_AUTH_MODE=token and make "
                                  "its token available here (~/.ray/auth_token, RAY_AUTH_TOKEN or "
                                  "RAY_AUTH_TOKEN_PATH)") from e
        return
    # address="local": always a fresh embedded cluster, even where an earlier `ray start --head`
    # left its address file behind (a plain ray.init would try to connect to it)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need_cpus + 0.999)), runtime_env=env,
             include_dashboard=dashboard, log_to_driver=True)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous; taken again only by chance)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundle_ip(pg, index: int) -> str:
    """IP address of the node that holds bundle ``index`` (learner rank 0: the rendezvous)."""
    node_id = placement_group_table(pg)["bundles_to_node_id"][index]
    for n in ray.nodes():
        if n["NodeID"] == node_id:
            return n["NodeManagerAddress"]
    return "127.0.0.1"


def start_zero_ranks(rank_cls: type, lc: LearnerConfig, device: str, rpc_timeout_s: float,
                     *args: Any) -> tuple[LearnerGroup, Any]:
    """Start ``lc.num_ranks`` DeepSpeed ZeRO rank actors alone, in a placement group of their own.

    For trainers without engines (``troupe rm train``: ``RewardModelRank``; SFT: ``SFTRank``).
    One bundle per rank (``lc.num_cpus_per_rank`` CPUs, ``lc.num_gpus_per_rank`` GPUs on
    ``device`` "gpu"), PACK; rank r is ``rank_cls(r, lc.num_ranks, master_addr, master_port, *args)``
    in bundle r, the rendezvous on bundle 0's node. Blocks until every rank is ready.

    Args:
        rank_cls: a ``troupe.learner.zero.ZeroRank`` subclass (plain class; made a Ray actor here).
        lc: the ``learner`` section.
        device: "cpu" (gloo; DS_ACCELERATOR=cpu, ``troupe.core.threads.cpu_thread_env(learner.torch_threads)``:
            OMP/MKL/OPENBLAS_NUM_THREADS, OMP_PROC_BIND=false, whatever the shell says) or "gpu".
        rpc_timeout_s: the group's longest wait for one call (``cluster.rpc_timeout_s``).
        *args: the rank class's arguments after the four group ones.
    Returns:
        ``(LearnerGroup, placement group)``: the caller shuts the group down and removes the placement group.
    Raises:
        TimeoutError: the placement group cannot be reserved in 120 s (lists what was asked for).
        troupe.core.rpc.ActorFailed / RemoteTimeout: a rank fails or hangs while starting (the ranks
            and the placement group are released first).
    """
    gpu = device == "gpu"
    bundles = [{k: v for k, v in {"CPU": lc.num_cpus_per_rank, "GPU": lc.num_gpus_per_rank if gpu else 0}.items()
                if v > 0} or {"CPU": 0.01} for _ in range(lc.num_ranks)]
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=120):
        remove_placement_group(pg)
        raise TimeoutError(f"placement group {bundles} could not be reserved; cluster has {ray.cluster_resources()}")
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", **cpu_thread_env(lc.torch_threads)}} if not gpu else None
    Rank = ray.remote(rank_cls)
    addr, port = _bundle_ip(pg, 0), free_port()
    kind = {"SFTRank": "sft-rank", "RewardModelRank": "rm-rank"}.get(rank_cls.__name__, "rank")
    ranks = [start_named(Rank, f"{kind}-{r}", (r, lc.num_ranks, addr, port, *args), num_cpus=b.get("CPU", 0),
                         num_gpus=b.get("GPU", 0), runtime_env=env,
                         scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                              placement_group_bundle_index=r))
             for r, b in enumerate(bundles)]
    group = LearnerGroup(ranks, rpc_timeout_s=rpc_timeout_s)
    try:
        group.ready()
    except BaseException:
        group.shutdown()
        remove_placement_group(pg)
        raise
    return group, pg


@dataclass
class Actors:
    """A run's actors: the engine group, the learner group, the reward lanes, and their placement group;
    with a ``critic`` section the critic's ranks (a second ZeRO group); with ``reward.iterative``, the reward-model trainer (``troupe.cluster.iterative.IterativeRewardModel``,
    set by ``troupe.cluster.train.train``, which knows the run directory)."""

    engines: EngineGroup
    learners: LearnerGroup
    rewards: RewardRouter
    pg: object
    iterative: Optional[Any] = None
    critic: Optional[LearnerGroup] = None  # PPO's value model (``critic`` section): CriticRank actors

    def single_node(self) -> bool:
        """True when Ray has one alive node (decides the weight-sync strategy)."""
        return len([n for n in ray.nodes() if n["Alive"]]) == 1

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        if self.iterative is not None:
            self.iterative.shutdown()
        self.engines.shutdown()
        self.learners.shutdown()
        if self.critic is not None:
            self.critic.shutdown()
        self.rewards.shutdown()
        remove_placement_group(self.pg)


def _bundles(cfg: RunConfig) -> list[dict]:
    """One placement-group bundle per engine, then one per learner rank, then one per critic rank (a ``critic``
    section), then one per actor of each reward model that asks for GPUs (``reward.models.N.num_gpus`` > 0, in config order): a GPU reward model outside
    the group could find every GPU held by it, and its actors would wait forever (issue 26)."""
    gpu = cfg.device == "gpu"
    ro, lc = cfg.rollout, cfg.learner
    bundles = [{"CPU": ro.num_cpus_per_engine, **({"GPU": ro.num_gpus_per_engine} if gpu else {})}
               for _ in range(ro.num_engines)]
    for ranks in (lc, cfg.critic) if cfg.critic is not None else (lc,):
        bundles += [{"CPU": ranks.num_cpus_per_rank, **({"GPU": ranks.num_gpus_per_rank} if gpu else {})}
                    for _ in range(ranks.num_ranks)]
    bundles += [{"CPU": m.num_cpus, "GPU": m.num_gpus} for m in _gpu_reward_models(cfg) for _ in range(m.num_workers)]
    return [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]


def _critic_ranks(cfg: RunConfig) -> int:
    return cfg.critic.num_ranks if cfg.critic is not None else 0


def _gpu_reward_models(cfg: RunConfig) -> list:
    """The reward models whose actors have bundles in the run's placement group (those with GPUs)."""
    return [m for m in cfg.reward.models if m.num_gpus > 0] if cfg.device == "gpu" else []


def reward_model_placement(cfg: RunConfig, pg) -> Callable[[str, int], dict]:
    """``placement(model name, slot) -> Ray actor options``: a GPU reward model's actor ``slot`` in its bundle of
    ``pg`` (after the engines' and the learner ranks', ``_bundles`` order); {} for a model without GPUs."""
    first, index = cfg.rollout.num_engines + cfg.learner.num_ranks + _critic_ranks(cfg), {}
    for m in _gpu_reward_models(cfg):
        index[m.name] = first
        first += m.num_workers

    def placement(name: str, slot: int) -> dict:
        if name not in index:
            return {}
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                        placement_group_bundle_index=index[name] + slot)}

    return placement


def thread_env(kind: str, cfg: RunConfig) -> dict[str, str]:
    """The thread variables troupe sets for one actor of ``kind`` ("engine" | "learner"); {} on GPU.

    On the CPU an engine runs ``threads_for_cpus(rollout.num_cpus_per_engine)`` threads (the CPUs
    its bundle reserves, floor, at least 1) and a learner rank ``learner.torch_threads``:
    ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and ``OMP_PROC_BIND=false``
    (``troupe.core.threads.cpu_thread_env``), overriding the shell's (module doc of core/threads.py).
    Engines also get ``VLLM_CPU_OMP_THREADS_BIND=nobind``: with vLLM 0.32's default ("auto",
    ``vllm/utils/ompmultiprocessing.py``) the CPU worker binds its OpenMP threads to every core of
    the first NUMA node but one and sets its own ``OMP_NUM_THREADS`` to that count, ignoring Ray's
    reservation: two engines on one node bind the same cores, and an engine asked for 4 CPUs on a
    64-core node runs 63 threads. Ray does not pin actors to cores, so troupe cannot hand vLLM a
    core list that matches the reservation; "nobind" leaves placement to the OS scheduler and the
    worker keeps the inherited ``OMP_NUM_THREADS``. On GPUs nothing is set (vLLM's GPU worker
    chooses its CPU threads itself and warns about an external ``OMP_NUM_THREADS`` > 1).
    Raises ``ValueError`` for another ``kind``.
    """
    if kind not in ("engine", "learner"):
        raise ValueError(f"thread_env: kind must be 'engine' or 'learner', got {kind!r}")
    if cfg.device != "cpu":
        return {}
    if kind == "learner":
        return cpu_thread_env(cfg.learner.torch_threads)
    return {**cpu_thread_env(threads_for_cpus(cfg.rollout.num_cpus_per_engine)), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def describe_thread_env(cfg: RunConfig, environ: Optional[dict] = None) -> str:
    """One log line: the threads :func:`thread_env` gives engines and learner ranks, and the shell
    variables (``environ``, default ``os.environ``) it overrides."""
    environ = dict(os.environ if environ is None else environ)
    if cfg.device != "cpu":
        return "threads: GPU run, CPU thread variables left to vLLM and DeepSpeed"
    eng, lrn = thread_env("engine", cfg), thread_env("learner", cfg)
    over = {**overridden(lrn, environ), **overridden(eng, environ)}
    line = (f"threads: engines {eng['OMP_NUM_THREADS']} (rollout.num_cpus_per_engine="
            f"{cfg.rollout.num_cpus_per_engine:g}, VLLM_CPU_OMP_THREADS_BIND=nobind), learner ranks "
            f"{lrn['OMP_NUM_THREADS']} (learner.torch_threads); OMP/MKL/OPENBLAS_NUM_THREADS and OMP_PROC_BIND=false set")
    if over:
        line += "; overriding the driver environment's " + ", ".join(f"{k}={v}" for k, v in sorted(over.items()))
    return line


def _actor_env(cfg: RunConfig, kind: str) -> dict:
    """runtime_env of an engine or a learner rank (``kind``): its thread variables (:func:`thread_env`)
    and the KV cache on CPU, quiet vLLM logs."""
    # vLLM logs a benign per-reload warning for every weight-less module (rotary embedding): keep
    # engine logs at ERROR unless the user set VLLM_LOGGING_LEVEL
    env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    if cfg.device == "cpu":
        env.update(VLLM_CPU_KVCACHE_SPACE=str(max(1, int(round(cfg.rollout.kv_cache_gib)))), DS_ACCELERATOR="cpu")
    env.update(thread_env(kind, cfg))
    return {"env_vars": env}


def _actor_options(cfg: RunConfig, pg, bundles: list[dict], i: int) -> dict:
    """Ray actor options of the actor in bundle ``i`` of ``pg`` (``_bundles`` order: engines, then learner
    ranks, then critic ranks): its resources, env and placement."""
    kind = "engine" if i < cfg.rollout.num_engines else "learner"
    env = _actor_env(cfg, kind)
    if cfg.critic is not None and i >= cfg.rollout.num_engines + cfg.learner.num_ranks and cfg.device == "cpu":
        env["env_vars"].update(cpu_thread_env(cfg.critic.torch_threads))
    return dict(num_cpus=bundles[i].get("CPU", 0), num_gpus=bundles[i].get("GPU", 0), runtime_env=env,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i))


def engine_factory(cfg: RunConfig, model_path: str, pg, bundles: list[dict]) -> Callable[[int], Any]:
    """``start(i) -> handle``: starts engine ``i`` in placement-group bundle ``i`` (``_bundles`` order).

    The same function starts the first engines and their replacements: same options, same seed,
    same bundle (a dead engine's bundle resources are free again once it is gone). It returns at
    once; the caller waits for ``ready()``.
    """
    Engine = ray.remote(RolloutEngine)

    def start(i: int) -> Any:
        return start_named(Engine, f"engine-{i}", (model_path, cfg.rollout),
                           dict(dtype=cfg.model.dtype, seed=cfg.seed + 1000 * i, device=cfg.device),
                           **_actor_options(cfg, pg, bundles, i))

    return start


def start_actors(cfg: RunConfig, model_path: str, log: Callable[[str], None] = print) -> Actors:
    """Reserve a placement group and start engines, learner ranks and reward workers concurrently.

    Reward workers: a ``troupe.reward.router.RewardRouter`` (a rules lane for ``reward.functions``,
    one lane of actors per reward model, each asking Ray for the model's ``num_cpus``/``num_gpus``; a
    model's actors with GPUs in their bundles of the placement group, ``reward_model_placement``).

    The engine group gets ``engine_factory`` to replace dead engines, ``cluster.rpc_timeout_s`` and
    ``cluster.max_engine_failures``; the learner group gets ``cluster.rpc_timeout_s``. ``log`` gets
    the threads chosen (:func:`describe_thread_env`) and the engine group's restart lines. Blocks
    until all are ready. Raises ``TimeoutError`` if the placement group cannot be reserved in 120 s
    (the message lists what was asked for), and the groups' ``ActorFailed`` / ``RemoteTimeout`` if
    an actor fails or hangs while starting.
    """
    bundles = _bundles(cfg)
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=120):
        raise TimeoutError(f"placement group {bundles} could not be reserved; cluster has {ray.cluster_resources()}")
    log(describe_thread_env(cfg))

    E, n, cl = cfg.rollout.num_engines, cfg.learner.num_ranks, cfg.cluster
    start_engine, Learner = engine_factory(cfg, model_path, pg, bundles), ray.remote(LearnerRank)
    engines = EngineGroup([start_engine(i) for i in range(E)], factory=start_engine, rpc_timeout_s=cl.rpc_timeout_s,
                          max_failures=cl.max_engine_failures, log=log, stall_timeout_s=cl.engine_stall_s)
    master_addr, master_port = _bundle_ip(pg, E), free_port()
    learners = LearnerGroup([start_named(Learner, f"learner-rank-{r}", (r, n, master_addr, master_port, model_path, cfg),
                                         **_actor_options(cfg, pg, bundles, E + r)) for r in range(n)],
                            rpc_timeout_s=cl.rpc_timeout_s)
    critic = None
    if cfg.critic is not None:  # its own process group: bundle E + n + r, rendezvous on its rank 0's node
        c, Critic = cfg.critic.num_ranks, ray.remote(CriticRank)
        addr, port = _bundle_ip(pg, E + n), free_port()
        critic = LearnerGroup([start_named(Critic, f"critic-rank-{r}", (r, c, addr, port, model_path, cfg),
                                           **_actor_options(cfg, pg, bundles, E + n + r)) for r in range(c)],
                              rpc_timeout_s=cl.rpc_timeout_s, kind="critic rank")
    rewards = RewardRouter(cfg.reward, ready_timeout_s=cl.rpc_timeout_s, model_placement=reward_model_placement(cfg, pg))
    engines.ready()
    learners.ready()
    if critic is not None:
        critic.ready()
    return Actors(engines, learners, rewards, pg, critic=critic)


def start_engines(cfg: RunConfig, model_path: str, log: Callable[[str], None] = print) -> tuple[EngineGroup, Any]:
    """Reserve a placement group for the engines alone and start them: sampling without a learner
    (``troupe rm pairs`` samples a saved policy).

    The bundles are ``_bundles``' engine bundles and the engines come from ``engine_factory`` (so a
    dead engine is replaced as in a run), with ``cluster.rpc_timeout_s`` and
    ``cluster.max_engine_failures``; ``log`` gets the threads line (:func:`describe_thread_env`) and
    the restart lines. Blocks until every engine is ready. Returns ``(engines, placement group)``:
    the caller shuts the engines down and removes the group. Raises ``TimeoutError`` if the group
    cannot be reserved in 120 s, and the engine group's ``ActorFailed`` / ``RemoteTimeout`` if an
    engine fails or hangs while starting (then the engines and the group are already released).
    """
    bundles = _bundles(cfg)[:cfg.rollout.num_engines]  # engines first, then learner ranks
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=120):
        remove_placement_group(pg)
        raise TimeoutError(f"placement group {bundles} could not be reserved; cluster has {ray.cluster_resources()}")
    log(describe_thread_env(cfg))
    start = engine_factory(cfg, model_path, pg, bundles)
    cl = cfg.cluster
    engines = EngineGroup([start(i) for i in range(cfg.rollout.num_engines)], factory=start,
                          rpc_timeout_s=cl.rpc_timeout_s, max_failures=cl.max_engine_failures, log=log,
                          stall_timeout_s=cl.engine_stall_s)
    try:
        engines.ready()
    except BaseException:
        engines.shutdown()
        remove_placement_group(pg)
        raise
    return engines, pg
