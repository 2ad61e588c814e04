"""EngineGroup's stall rule (``cluster.engine_stall_s``) with tiny real Ray actors standing in for
engines: an engine whose generate never returns is the fault injected on purpose. The same rule on
real vLLM engines (one frozen with SIGSTOP): tests/test_engine_slow.py."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray


class _Engine:
    """Answers generate with one "group" per prompt, or (``hang``) never answers."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    def generate(self, prompts, sampling, seeds):
        while self.hang:
            time.sleep(1.0)
        return [f"g{p}" for p in prompts]

    def ready(self) -> dict:
        return {"version": 0}

    def get_version(self) -> int:
        return 0


def _group(ray, first_hangs: bool, replacements_hang: bool, **kw):
    from troupe.rollout.engine_group import EngineGroup

    E = ray.remote(_Engine).options(num_cpus=0)
    made, logs = [], []

    def factory(i):
        made.append(i)
        return E.remote(replacements_hang)

    group = EngineGroup([E.remote(first_hangs), E.remote(False)], chunks_per_engine=2, factory=factory,
                        rpc_timeout_s=600.0, stall_timeout_s=2.0, log=logs.append, **kw)
    group.ready()  # started, as a run's engines are before they generate: start-up is not a stall
    return group, made, logs


def test_wedged_engine_is_replaced_and_its_chunks_resampled(ray_local):
    from troupe.core.types import Sampling

    group, made, logs = _group(ray_local, first_hangs=True, replacements_hang=False)
    try:
        out, t = group.generate(list(range(8)), Sampling(n=1, max_new_tokens=4), seeds=list(range(8)))
        assert out == [f"g{p}" for p in range(8)]  # one group per prompt, in order, none lost
        assert made == [0] and t["engine_restarts"] == 1 and group.restarts == 1
        assert len(logs) == 1 and "engine 0 restarted" in logs[0] and "wedged" in logs[0], logs
        assert "cluster.engine_stall_s" in logs[0]
        out, t = group.generate(list(range(4)), Sampling(n=1, max_new_tokens=4), seeds=list(range(4)))  # the replacement serves
        assert out == [f"g{p}" for p in range(4)] and t["engine_restarts"] == 0
    finally:
        group.shutdown()


def test_stall_without_factory_raises_naming_the_engine(ray_local):
    from troupe.core.types import Sampling
    from troupe.rollout.engine_group import EngineGroup, EngineStalled

    E = ray_local.remote(_Engine).options(num_cpus=0)
    group = EngineGroup([E.remote(True)], stall_timeout_s=2.0, rpc_timeout_s=600.0)
    try:
        with pytest.raises(EngineStalled, match=r"engine 0 finished no generate chunk for 2 s \(cluster.engine_stall_s\)"):
            group.generate([1, 2], Sampling(n=1, max_new_tokens=4), seeds=[1, 2])
    finally:
        group.shutdown()


def test_replacements_that_stall_too_stop_the_run(ray_local):
    from troupe.core.types import Sampling

    group, made, logs = _group(ray_local, first_hangs=True, replacements_hang=True, max_failures=1)
    try:
        with pytest.raises(RuntimeError, match=r"2 engine failures in a row .*wedged.*the run stops"):
            group.generate(list(range(4)), Sampling(n=1, max_new_tokens=4), seeds=list(range(4)))
        assert made == [0] and len(logs) == 1  # one replacement, then the second stall stops it
    finally:
        group.shutdown()


class _SyncEngine:
    """Takes a weight update (``begin_weights`` .. ``finish_weights``), or (``hang``) never finishes one: an
    NCCL broadcast whose other side died waits like this."""

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    def begin_weights(self, version: int) -> None:
        while self.hang:
            time.sleep(1.0)

    def finish_weights(self, version: int) -> dict:
        return {"version": version}

    def ready(self) -> dict:
        return {"version": 0}

    def get_version(self) -> int:
        return 0


def test_a_weight_sync_that_never_finishes_is_named_after_the_sync_deadline(ray_local):
    """sync.timeout_s (here 3 s) bounds the engines' weight-sync calls, not cluster.rpc_timeout_s (600 s)."""
    from troupe.core.rpc import RemoteTimeout
    from troupe.rollout.engine_group import EngineGroup

    E = ray_local.remote(_SyncEngine).options(num_cpus=0)
    group = EngineGroup([E.remote(False), E.remote(True)], rpc_timeout_s=600.0)
    calls = [lambda h: h.begin_weights.remote(1), lambda h: h.finish_weights.remote(1)]
    t0 = time.time()
    try:
        with pytest.raises(RemoteTimeout, match=r"after 3 s \(sync.timeout_s\) waiting for weight sync v1 on engine 1$"):
            group.load_weight_stream(1, iter(calls), reload=lambda h: None, timeout_s=3.0)
        assert time.time() - t0 < 60
    finally:
        group.shutdown()
