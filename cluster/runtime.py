"""Start Ray and place every actor explicitly: engines, learner ranks, reward workers.

Engines and learner ranks get one bundle each in a single placement group (PACK), so their
CPUs/GPUs are reserved before anything starts and a run that cannot fit fails at once with
the resources it asked for. Reward workers with ``num_cpus_per_worker = 0`` float freely.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from troupe.configs.schema import RunConfig
from troupe.learner.zero import LearnerRank
from troupe.reward.pool import RewardPool
from troupe.rollout.engine import RolloutEngine


def init_ray(cfg: RunConfig, address: str | None, dashboard: bool = False) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start an embedded local cluster sized for the run.

    ``dashboard`` starts the Ray dashboard (http://127.0.0.1:8265) with the local cluster.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    need = cfg.rollout.num_engines * cfg.rollout.num_cpus_per_engine + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank \
        + cfg.reward.num_workers * cfg.reward.num_cpus_per_worker
    ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), runtime_env=env,
             include_dashboard=dashboard, log_to_driver=True)


def _free_port() -> int:
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


@dataclass
class Actors:
    """Handles of a run's actors."""

    engines: list
    learners: list
    rewards: RewardPool
    pg: object

    def single_node(self) -> bool:
        """True when Ray has one alive node (decides the weight-sync strategy)."""
        return len([n for n in ray.nodes() if n["Alive"]]) == 1

    def shutdown(self) -> None:
        """Kill the actors and free the placement group."""
        for a in self.engines + self.learners:
            ray.kill(a)
        self.rewards.shutdown()
        remove_placement_group(self.pg)


def start_actors(cfg: RunConfig, model_path: str) -> Actors:
    """Reserve a placement group and start engines, learner ranks and reward workers concurrently.

    Blocks until all are ready. Raises ``TimeoutError`` if the placement group cannot be
    reserved in 120 s (the message lists what was asked for).
    """
    gpu = cfg.device == "gpu"
    ro, lc = cfg.rollout, cfg.learner
    bundles = [{"CPU": ro.num_cpus_per_engine, **({"GPU": ro.num_gpus_per_engine} if gpu else {})}
               for _ in range(ro.num_engines)]
    bundles += [{"CPU": lc.num_cpus_per_rank, **({"GPU": lc.num_gpus_per_rank} if gpu else {})}
                for _ in range(lc.num_ranks)]
    bundles = [{k: v for k, v in b.items() if v > 0} or {"CPU": 0.01} for b in bundles]
    pg = placement_group(bundles, strategy="PACK")
    if not pg.wait(timeout_seconds=120):
        raise TimeoutError(f"placement group {bundles} could not be reserved; cluster has {ray.cluster_resources()}")

    def strat(i: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)

    # vLLM logs a benign per-reload warning for every weight-less module (rotary embedding): keep
    # engine logs at ERROR unless the user set VLLM_LOGGING_LEVEL
    log_env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    cpu_env = {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(ro.kv_cache_gib)))),
                            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(lc.torch_threads), **log_env}} \
        if not gpu else {"env_vars": log_env}
    Engine = ray.remote(RolloutEngine)
    engines = [
        Engine.options(num_cpus=bundles[i].get("CPU", 0), num_gpus=bundles[i].get("GPU", 0), scheduling_strategy=strat(i),
                       runtime_env=cpu_env).remote(
            model_path, dtype=cfg.model.dtype, max_model_len=ro.max_model_len, seed=cfg.seed + 1000 * i,
            device=cfg.device, kv_cache_gib=ro.kv_cache_gib, gpu_memory_utilization=ro.gpu_memory_utilization,
            enforce_eager=ro.enforce_eager, tensor_parallel_size=max(1, int(ro.num_gpus_per_engine)))
        for i in range(ro.num_engines)
    ]
    Learner = ray.remote(LearnerRank)
    master_addr, master_port = _bundle_ip(pg, ro.num_engines), _free_port()
    per_rank = cfg.batch_size // lc.num_ranks
    learners = [
        Learner.options(num_cpus=bundles[ro.num_engines + r].get("CPU", 0), num_gpus=bundles[ro.num_engines + r].get("GPU", 0),
                        scheduling_strategy=strat(ro.num_engines + r), runtime_env=cpu_env).remote(
            r, lc.num_ranks, master_addr, master_port, model_path, cfg.model_dump(mode="json"),
            per_rank // cfg.algo.mini_batches)
        for r in range(lc.num_ranks)
    ]
    rewards = RewardPool(cfg.reward)
    ray.get([e.ready.remote() for e in engines] + [lr.ready.remote() for lr in learners])
    return Actors(engines, learners, rewards, pg)
