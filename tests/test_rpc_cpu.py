"""core/rpc.py with tiny real Ray actors: deadlines, deaths found while others still run, errors raised
inside a live actor, and the ``fetch`` mask."""

from __future__ import annotations

import os
import time

import pytest

pytestmark = pytest.mark.ray


class Worker:
    """A tiny actor: sleeps, dies, raises, or returns its argument."""

    def sleep(self, seconds: float) -> str:
        time.sleep(seconds)
        return "slept"

    def die(self, after: float = 0.0) -> None:
        time.sleep(after)
        os._exit(1)

    def fail(self) -> None:
        raise ValueError("bad input")

    def echo(self, x):
        return x


@pytest.fixture(scope="module")
def workers(ray_local):
    ray = ray_local
    W = ray.remote(Worker).options(num_cpus=0)
    return ray, W


def test_timeout_names_the_actor(workers):
    from troupe.core.rpc import RemoteTimeout, get_one, wait_all

    ray, W = workers
    a, b = W.remote(), W.remote()
    ray.get([a.echo.remote(0), b.echo.remote(0)])  # both started: only b's nap can outlive the deadline
    t0 = time.monotonic()
    with pytest.raises(RemoteTimeout) as ei:
        wait_all([a.echo.remote(1), b.sleep.remote(30)], ["worker a", "worker b"], "nap", 1.0)
    assert time.monotonic() - t0 < 10
    assert ei.value.names == ["worker b"] and "worker b" in str(ei.value) and "nap" in str(ei.value)
    with pytest.raises(RemoteTimeout, match="worker a"):
        get_one(a.sleep.remote(30), "worker a", "nap", 0.5)
    for h in (a, b):
        ray.kill(h)


def test_death_is_reported_while_another_call_still_sleeps(workers):
    from troupe.core.rpc import ActorFailed, wait_all

    ray, W = workers
    sleeper, dying = W.remote(), W.remote()
    ray.get([sleeper.echo.remote(0), dying.echo.remote(0)])
    t0 = time.monotonic()
    with pytest.raises(ActorFailed) as ei:
        wait_all([sleeper.sleep.remote(60), dying.die.remote(0.5)], ["sleeper", "dying one"], "work", 120.0)
    assert time.monotonic() - t0 < 30  # not after the sleeper's 60 s
    assert ei.value.died and ei.value.name == "dying one" and "dying one failed during work" in str(ei.value)
    ray.kill(sleeper)


def test_exception_in_live_actor_is_not_a_death(workers):
    from troupe.core.rpc import ActorFailed, get_one, wait_all

    ray, W = workers
    a = W.remote()
    with pytest.raises(ActorFailed) as ei:
        wait_all([a.echo.remote(1), a.fail.remote()], ["worker a", "worker a"], "check", 30.0)
    assert not ei.value.died and ei.value.name == "worker a" and "bad input" in str(ei.value)
    with pytest.raises(ActorFailed) as ei:
        get_one(a.fail.remote(), "worker a", "check", 30.0)
    assert not ei.value.died
    assert get_one(a.echo.remote(5), "worker a", "check", 30.0) == 5  # still alive
    ray.kill(a)


def test_fetch_mask_returns_the_ref(workers):
    from troupe.core.rpc import wait_all

    ray, W = workers
    a = W.remote()
    refs = [a.echo.remote("big"), a.echo.remote(2)]
    out = wait_all(refs, ["worker a", "worker a"], "echo", 30.0, fetch=[False, True])
    assert out[0] is refs[0] and ray.get(out[0]) == "big" and out[1] == 2
    ray.kill(a)


def test_start_named_takes_the_next_free_name(workers):
    from troupe.core.rpc import start_named

    ray, _ = workers
    W = ray.remote(Worker)
    first = start_named(W, "worker-x", num_cpus=0)
    second = start_named(W, "worker-x", num_cpus=0)  # the name is held by a live actor: worker-x.1
    assert ray.get_actor("worker-x")._actor_id == first._actor_id
    assert ray.get_actor("worker-x.1")._actor_id == second._actor_id
    assert ray.get(second.echo.remote(3)) == 3
    for a in (first, second):
        ray.kill(a)


def test_reward_model_lane_that_cannot_be_placed_times_out_by_name(ray_local, rm_dir):
    """A reward model asking for a GPU the cluster does not have: its actor is never placed, and the router's
    ready wait ends after its deadline (runs pass cluster.rpc_timeout_s) with a TimeoutError naming the lane."""
    from troupe.configs.schema import RewardConfig
    from troupe.reward.router import RewardRouter

    cfg = RewardConfig.model_validate({"functions": [], "models": [{"path": rm_dir, "name": "rm", "num_gpus": 1}]})
    with pytest.raises(TimeoutError, match=r"reward lane 'rm' .*not ready after 3 s \(cluster.rpc_timeout_s\).*num_gpus"):
        RewardRouter(cfg, ready_timeout_s=3.0)  # without the deadline this waits forever (pytest-timeout fails it)


def test_a_gpu_reward_models_actors_have_bundles_in_the_runs_placement_group():
    """device gpu: each actor of a reward model with GPUs gets a bundle after the engines' and the ranks'
    (issue 26: outside the group it could find every GPU taken); a model without GPUs stays outside."""
    from pathlib import Path

    from troupe.cluster.runtime import _bundles, reward_model_placement
    from troupe.configs.schema import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "arith_cpu.yaml", [
        "device=gpu", "rollout.num_gpus_per_engine=1", "learner.num_gpus_per_rank=1", "learner.num_ranks=2",
        "reward.models=[{path: a, name: big, num_gpus: 1, num_workers: 2, num_cpus: 2}, {path: b, name: small}]"])
    bundles = _bundles(cfg)
    assert bundles[3:] == [{"CPU": 2, "GPU": 1}] * 2 and len(bundles) == 5  # 1 engine, 2 ranks, 2 reward-model actors
    place = reward_model_placement(cfg, pg=None)
    assert [place("big", s)["scheduling_strategy"].placement_group_bundle_index for s in (0, 1)] == [3, 4]
    assert place("small", 0) == {}


def test_reward_model_actors_start_in_the_bundles_they_are_given(ray_local, rm_dir):
    """RewardRouter's model_placement reaches the lane's actors: the actor runs in the placement group."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from troupe.configs.schema import RewardConfig
    from troupe.reward.router import RewardRouter

    pg = placement_group([{"CPU": 0.5}])
    assert pg.wait(timeout_seconds=60)
    cfg = RewardConfig.model_validate({"functions": [], "models": [{"path": rm_dir, "name": "rm", "num_cpus": 0.5}]})
    seen = []

    def place(name, slot):
        seen.append((name, slot))
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=slot)}

    router = RewardRouter(cfg, ready_timeout_s=120.0, model_placement=place)
    try:
        [lane] = router._lanes
        [worker] = lane.pool._workers
        pg_id = ray_local.get(worker.__ray_call__.remote(lambda self: __import__("ray").get_runtime_context().get_placement_group_id()))
        assert seen == [("rm", 0)] and pg_id == pg.id.hex()
    finally:
        router.shutdown()
        remove_placement_group(pg)
