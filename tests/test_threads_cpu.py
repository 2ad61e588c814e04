"""The actors' thread environment (troupe.core.threads, troupe.cluster.runtime.thread_env): what is
chosen for engines, learner ranks and reward workers, whatever the driver's shell says.

The engine/learner side under a hostile shell, with throughput, is tests/test_threads_slow.py.
The reward-worker test starts its own local Ray cluster from a hostile environment (the raylet
and its workers inherit the environment ``ray.init`` sees).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from troupe.core.threads import THREAD_VARS, cpu_thread_env, overridden, threads_for_cpus, with_thread_env

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "thread_rewards.py"
HOSTILE = {"MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "7", "OPENBLAS_NUM_THREADS": "5"}


def _cfg(*overrides: str):
    from troupe.configs.schema import load_config

    return load_config(REPO / "configs" / "arith_cpu.yaml", list(overrides))


@pytest.mark.parametrize("cpus, threads", [(0, 1), (0.01, 1), (0.5, 1), (1, 1), (1.99, 1), (2, 2), (7.5, 7)])
def test_threads_for_cpus_is_floor_at_least_one(cpus, threads):
    assert threads_for_cpus(cpus) == threads


@pytest.mark.parametrize("cpus", [-1, math.nan, math.inf])
def test_threads_for_cpus_rejects_bad_counts(cpus):
    with pytest.raises(ValueError, match="num_cpus"):
        threads_for_cpus(cpus)


def test_cpu_thread_env_sets_every_library_and_unbinds():
    assert cpu_thread_env(3) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3",
                                 "OMP_PROC_BIND": "false"}
    with pytest.raises(ValueError, match="threads"):
        cpu_thread_env(0)


def test_with_thread_env_keeps_the_callers_values():
    caller = {"env_vars": {"PYTHONPATH": "/x", "OMP_NUM_THREADS": "4"}, "pip": ["y"]}
    env = with_thread_env(caller, 2)
    assert env == {"env_vars": {"PYTHONPATH": "/x", "OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "2",
                                "OPENBLAS_NUM_THREADS": "2", "OMP_PROC_BIND": "false"}, "pip": ["y"]}
    assert caller == {"env_vars": {"PYTHONPATH": "/x", "OMP_NUM_THREADS": "4"}, "pip": ["y"]}  # not modified
    assert with_thread_env(None, 1) == {"env_vars": cpu_thread_env(1)}


def test_overridden_lists_only_differing_shell_values():
    assert overridden(cpu_thread_env(1), {**HOSTILE, "OMP_PROC_BIND": "false", "HOME": "/h"}) == HOSTILE
    assert overridden(cpu_thread_env(1), {"MKL_NUM_THREADS": "1"}) == {}


def test_engine_threads_follow_its_cpus_and_learner_threads_torch_threads():
    from troupe.cluster.runtime import _actor_env, thread_env

    cfg = _cfg("rollout.num_cpus_per_engine=2.5", "learner.torch_threads=3")
    eng, lrn = thread_env("engine", cfg), thread_env("learner", cfg)
    assert eng == {**cpu_thread_env(2), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    assert lrn == cpu_thread_env(3)
    assert set(eng) <= set(THREAD_VARS) and set(lrn) <= set(THREAD_VARS)
    # the runtime_env the actors get carries them, next to the KV cache and the DeepSpeed accelerator
    assert _actor_env(cfg, "engine")["env_vars"].items() >= {**eng, "VLLM_CPU_KVCACHE_SPACE": "1"}.items()
    assert _actor_env(cfg, "learner")["env_vars"].items() >= {**lrn, "DS_ACCELERATOR": "cpu"}.items()
    assert thread_env("engine", _cfg("rollout.num_cpus_per_engine=0"))["OMP_NUM_THREADS"] == "1"
    with pytest.raises(ValueError, match="kind"):
        thread_env("reward", cfg)


def test_gpu_runs_leave_threads_to_vllm_and_deepspeed():
    from troupe.cluster.runtime import describe_thread_env, thread_env

    cfg = _cfg("device=gpu", "rollout.num_gpus_per_engine=1", "learner.num_gpus_per_rank=1")
    assert thread_env("engine", cfg) == {} and thread_env("learner", cfg) == {}
    assert "GPU" in describe_thread_env(cfg, {})


def test_start_up_line_says_what_was_chosen_and_what_it_overrides():
    from troupe.cluster.runtime import describe_thread_env

    cfg = _cfg("rollout.num_cpus_per_engine=2", "learner.torch_threads=1")
    line = describe_thread_env(cfg, HOSTILE)
    assert line.startswith("threads: engines 2 (rollout.num_cpus_per_engine=2") and "learner ranks 1" in line
    assert "overriding the driver environment's MKL_NUM_THREADS=2, OMP_NUM_THREADS=7, OPENBLAS_NUM_THREADS=5" in line
    assert "overriding" not in describe_thread_env(cfg, {})


@pytest.fixture(scope="module")
def ray_hostile():
    """A local Ray cluster (2 CPUs) started while this process's environment is ``HOSTILE``."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    saved = {k: os.environ.get(k) for k in HOSTILE}
    os.environ.update(HOSTILE)
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield ray
        ray.shutdown()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.ray
def test_reward_workers_get_threads_from_their_cpus_not_the_shell(ray_hostile):
    from troupe.configs.schema import RewardConfig, RewardFunctionConfig
    from troupe.core.types import Group, Prompt, Sample
    from troupe.reward.pool import RewardPool

    cfg = RewardConfig(num_workers=1, functions=[RewardFunctionConfig(name=f"{PROBE}:mkl_threads", weight=1.0),
                                                 RewardFunctionConfig(name=f"{PROBE}:omp_threads", weight=0.0)])
    groups = [Group(Prompt(0, "q", [], "q", "0"), [Sample([], [], "c", False, 0)])]
    for cpus, want in [(0, 1.0), (2, 2.0)]:
        pool = RewardPool(cfg, num_cpus_per_worker=cpus)
        try:
            parts = pool.score_now(groups)[0].reward_parts
        finally:
            pool.shutdown()
        assert parts[f"{PROBE}:mkl_threads"] == [want] and parts[f"{PROBE}:omp_threads"] == [want], (cpus, parts)
    # a variable the caller's runtime_env sets wins
    pool = RewardPool(cfg, runtime_env={"env_vars": {"MKL_NUM_THREADS": "3"}})
    try:
        assert pool.score_now(groups)[0].reward_parts[f"{PROBE}:mkl_threads"] == [3.0]
    finally:
        pool.shutdown()
