"""Bounded staleness: the pure bound (troupe.rollout.staleness), the rollout thread's gate and pause
(troupe.cluster.rollout_ahead), and the config rules for rollout.max_staleness."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from troupe.cluster.rollout_ahead import RolloutAhead
from troupe.configs.schema import ConfigError, load_config
from troupe.core.types import Group, Prompt, Sample
from troupe.rollout.staleness import group_staleness, split_stale, staleness_metrics

REPO = Path(__file__).resolve().parents[1]


def _group(version: int, n: int = 2) -> Group:
    prompt = Prompt(uid=0, text="1+1", token_ids=[1, 2], question="1+1", answer="2")
    return Group(prompt=prompt, samples=[Sample([3], [-0.1], "2", False, version) for _ in range(n)])


def test_staleness_is_the_learner_version_minus_the_oldest_sample():
    g = _group(3)
    g.samples[1].policy_version = 2
    assert group_staleness(g, 5) == 3
    assert group_staleness(_group(5), 5) == 0
    with pytest.raises(ValueError, match="newer than the learner"):
        group_staleness(_group(6), 5)


def test_a_group_over_the_bound_is_dropped_and_counted():
    groups = [_group(4), _group(2), _group(3), _group(1)]  # learner at version 4: staleness 0, 2, 1, 3
    kept, dropped = split_stale(groups, 4, max_staleness=1)
    assert kept == [groups[0], groups[2]] and dropped == [1, 3]
    m = staleness_metrics(kept, 4, 1, dropped=len(dropped))
    assert m["staleness/groups_0"] == 1 and m["staleness/groups_1"] == 1
    assert m["staleness/mean"] == 0.5 and m["staleness/max"] == 1 and m["staleness/dropped_groups"] == 2
    assert split_stale(groups, 4, max_staleness=3) == (groups, [])
    with pytest.raises(ValueError, match="max_staleness"):
        split_stale(groups, 4, -1)


def _ahead(max_staleness: int, last: int, events: list, gate: threading.Event | None = None) -> RolloutAhead:
    state = {"taken": 0}

    def produce(step: int):
        events.append(("start", step))
        if gate is not None:
            gate.wait(5)
        state["taken"] += 1
        events.append(("end", step))
        return [_group(0)], {"time/generate": 0.0}

    return RolloutAhead(produce, 1, last, max_staleness, version=0, snapshot=lambda: {"taken": state["taken"]})


def _wait_for(cond, timeout: float = 5.0) -> None:
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_the_rollout_runs_at_most_max_staleness_steps_ahead():
    events: list = []
    ahead = _ahead(1, 4, events)
    try:
        # engines at v0: step 1 (needs v >= -1) and step 2 (needs v >= 0) may run; step 3 needs v >= 1
        _wait_for(lambda: ("end", 2) in events)
        time.sleep(0.2)
        assert ("start", 3) not in events
        groups, info = ahead.get(1)
        assert len(groups) == 1 and info["time/learner_idle"] >= 0 and "time/engine_idle" in info
        ahead.published(1)
        _wait_for(lambda: ("end", 3) in events)
        time.sleep(0.2)
        assert ("start", 4) not in events
        ahead.published(2)
        for step in (2, 3, 4):
            ahead.get(step)
        assert [e for e in events if e[0] == "start"] == [("start", s) for s in (1, 2, 3, 4)]
        with pytest.raises(RuntimeError, match="produces steps 1..4"):
            ahead.get(5)
    finally:
        ahead.close()


def test_paused_waits_for_the_batch_in_flight_and_holds_the_next():
    events: list = []
    gate = threading.Event()
    ahead = _ahead(2, 3, events, gate)
    try:
        _wait_for(lambda: ("start", 1) in events)
        entered = threading.Event()

        def pause_then_release():
            with ahead.paused():
                entered.set()
                time.sleep(0.3)
                assert ("start", 2) not in events  # held while paused
                # the stream as it was before step 2 took its prompts: step 1's take done, step 2's not
                assert ahead.stream_state_before(2) is None
                assert ahead.stream_state_before(1) == {"taken": 0}

        t = threading.Thread(target=pause_then_release)
        t.start()
        time.sleep(0.2)
        assert not entered.is_set()  # step 1 is still in flight
        gate.set()
        t.join(5)
        assert entered.is_set() and not t.is_alive()
        ahead.get(1), ahead.get(2), ahead.get(3)
        assert ahead.stream_state_before(3) is None  # dropped once step 3 was handed over
    finally:
        ahead.close()


def test_an_error_in_the_rollout_reaches_the_learner():
    def produce(step: int):
        if step == 2:
            raise RuntimeError("engine 0 died")
        return [_group(0)], {}

    ahead = RolloutAhead(produce, 1, 3, 1, version=0, snapshot=dict)
    try:
        ahead.get(1)
        with pytest.raises(RuntimeError, match="engine 0 died"):
            ahead.get(2)
    finally:
        ahead.close()
    with pytest.raises(ValueError, match="max_staleness must be >= 1"):
        RolloutAhead(produce, 1, 3, 0, version=0, snapshot=dict)


def test_close_with_a_timeout_abandons_a_batch_stuck_in_a_remote_call():
    """On an error path the run does not wait cluster.rpc_timeout_s for a rollout stuck on a dead actor."""
    stuck, release = threading.Event(), threading.Event()

    def produce(step: int):
        stuck.set()
        release.wait(30)  # a remote call that does not come back
        return [_group(0)], {}

    ahead = RolloutAhead(produce, 1, 3, 1, version=0, snapshot=dict)
    _wait_for(stuck.is_set)
    t0 = time.time()
    assert ahead.close(timeout=0.2) is False  # abandoned, still inside produce
    assert time.time() - t0 < 5
    release.set()  # the call fails or returns (the actor teardown): the thread then ends by itself
    _wait_for(lambda: ahead.close(timeout=0.1))
    with pytest.raises(RuntimeError, match="closed"):
        ahead.get(2)


def test_max_staleness_config_rules():
    demo = REPO / "configs" / "arith_cpu.yaml"
    assert load_config(demo).rollout.max_staleness == 0  # the synchronous loop stays the default
    assert load_config(demo, ["rollout.max_staleness=2", "algo.tis_cap=2.0"]).rollout.max_staleness == 2
    with pytest.raises(ConfigError, match="needs sync.every = 1"):
        load_config(demo, ["rollout.max_staleness=1", "sync.every=2"])
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(demo, ["rollout.max_staleness=-1"])


def test_old_logp_auto_is_the_engines_policy_only_when_pipelined():
    demo = REPO / "configs" / "arith_cpu.yaml"
    assert load_config(demo).algo.old_logp == "learner"
    assert load_config(demo, ["rollout.max_staleness=1"]).algo.old_logp == "sampling"
    assert load_config(demo, ["rollout.max_staleness=1", "algo.old_logp=learner"]).algo.old_logp == "learner"
    assert load_config(demo, ["algo.old_logp=sampling"]).algo.old_logp == "sampling"
    with pytest.raises(ConfigError, match="old_logp"):
        load_config(demo, ["algo.old_logp=behaviour"])
