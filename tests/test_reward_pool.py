"""Reward plugin loading, fault-tolerant scoring, and the Ray reward-worker pool.

The fault-injection reward functions live in tests/reward_plugins.py, loaded by name
(``reward_plugins:<fn>``): pytest puts this folder on sys.path for the test process, and the
``ray_local`` fixture (tests/conftest.py) puts it on the workers' PYTHONPATH. Tests that start
Ray are marked ``ray``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from troupe.configs.schema import RewardConfig, RewardFunctionConfig
from troupe.core.types import Group, Prompt, Sample
from troupe.reward.registry import BUILTIN_REWARDS, load_reward_function
from troupe.reward.scoring import (
    RESERVED_COLUMNS,
    RewardSet,
    call_with_timeout,
    column_names,
    reward_columns,
    score_batch,
)

TESTS_DIR = Path(__file__).resolve().parent


def _fns(*specs_weights):
    return [(spec, load_reward_function(spec), w) for spec, w in specs_weights]


def _score(fns, completions, *, timeout_s=5.0, on_failure="zero", **columns):
    n = len(completions)
    columns.setdefault("answer", ["0"] * n)
    return score_batch(fns, ["q"] * n, completions, columns, timeout_s=timeout_s, on_failure=on_failure)


# ---------------------------------------------------------------- loader


def test_builtin_names():
    assert set(BUILTIN_REWARDS) == {"accuracy", "format", "gsm8k", "math", "language"}
    for name in BUILTIN_REWARDS:
        assert load_reward_function(name) is BUILTIN_REWARDS[name]


def test_builtin_adapters_trl_signature():
    prompts = ["What is 3+4?", "What is 3+4?"]
    completions = ["<think>3+4=7</think><answer>7</answer>", "<think>hmm</think><answer>8</answer>"]
    answer = ["7", "7"]
    assert BUILTIN_REWARDS["accuracy"](prompts=prompts, completions=completions, answer=answer) == [1.0, 0.0]
    assert BUILTIN_REWARDS["gsm8k"](prompts=prompts, completions=completions, answer=answer, extra=[1, 2]) == [1.0, 0.0]
    assert BUILTIN_REWARDS["math"](prompts=prompts, completions=completions, answer=answer) == [1.0, 0.0]
    assert BUILTIN_REWARDS["format"](prompts=prompts, completions=completions, answer=answer) == [1.0, 1.0]
    assert BUILTIN_REWARDS["language"](prompts=prompts, completions=completions, answer=answer) == [1.0, 1.0]
    # TRL conversational completions (lists of messages) are read as their last content
    conv = [[{"role": "assistant", "content": c}] for c in completions]
    assert BUILTIN_REWARDS["accuracy"](prompts=prompts, completions=conv, answer=answer) == [1.0, 0.0]


def test_load_plugin_by_module_name():
    fn = load_reward_function("reward_plugins:good")
    assert fn(prompts=["q"], completions=["ok 3"], answer=["x"]) == [3.0]


def test_load_plugin_by_file_path():
    fn = load_reward_function(f"{TESTS_DIR / 'reward_plugins.py'}:good")
    assert fn(prompts=["q"], completions=["ok 2"]) == [2.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
        ("reward_plugins:does_not_exist", "has no attribute 'does_not_exist'"),
        ("reward_plugins:NOT_CALLABLE", "not callable"),
        ("reward_plugins:no_kwargs", "cannot accept (prompts, completions, **kwargs)"),
        ("reward_plugins:positional_only", "cannot accept (prompts, completions, **kwargs)"),
        ("/no/such/file.py:fn", "file not found"),
        ("not_a_builtin", "not a built-in"),
        ("reward_plugins:", "empty module/file or function name"),
    ],
)
def test_loader_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError) as exc:
        load_reward_function(spec)
    text = str(exc.value)
    assert repr(spec) in text
    assert message in text


# ---------------------------------------------------------------- scoring with injected faults


def test_exception_is_isolated_to_its_sample():
    res = _score(_fns(("reward_plugins:raises_on_boom", 1.0)), ["ok 1", "ok 2", "boom", "ok 4"])
    assert res.failures == {"exception": 1}
    assert res.parts["reward_plugins:raises_on_boom"] == [1.0, 2.0, None, 4.0]
    assert res.rewards == [1.0, 2.0, 0.0, 4.0]
    assert res.errors["reward_plugins:raises_on_boom"] == [None, None, "exception", None]
    assert "boom" in res.messages["reward_plugins:raises_on_boom"]


def test_timeout_is_isolated_to_its_sample():
    t0 = time.perf_counter()
    res = _score(_fns(("reward_plugins:hangs_on_hang", 1.0)), ["ok 1", "hang", "ok 3"], timeout_s=0.5)
    elapsed = time.perf_counter() - t0
    assert res.failures == {"timeout": 1}
    assert res.rewards == [1.0, 0.0, 3.0]
    assert res.parts["reward_plugins:hangs_on_hang"] == [1.0, None, 3.0]
    assert elapsed < 5.0  # batch 0.5 s + one per-sample 0.5 s, not the 30 s sleep


def test_nan_and_wrong_type():
    res = _score(_fns(("reward_plugins:nan_on_nan", 1.0)), ["ok 1", "nan", "ok 2"])
    assert res.failures == {"nan": 1}
    assert res.rewards == [1.0, 0.0, 2.0]
    res = _score(_fns(("reward_plugins:str_on_str", 1.0)), ["str", "ok 5"])
    assert res.failures == {"type": 1}
    assert res.rewards == [0.0, 5.0]


def test_wrong_length_and_scalar_are_type_failures():
    res = _score(_fns(("reward_plugins:wrong_length", 1.0)), ["ok 1", "ok 2", "ok 3"])
    assert res.failures == {"type": 3}
    res = _score(_fns(("reward_plugins:scalar", 1.0)), ["ok 1", "ok 2"])
    assert res.failures == {"type": 2}
    assert res.rewards == [0.0, 0.0]


def test_none_is_no_score_not_failure():
    res = _score(_fns(("reward_plugins:none_on_none", 1.0)), ["ok 1", "none", "ok 3"], on_failure="zero")
    assert res.failures == {}
    assert res.none_count == 1
    assert res.rewards == [1.0, None, 3.0]


def test_on_failure_zero_vs_exclude():
    fns = _fns(("reward_plugins:good", 1.0), ("reward_plugins:raises_on_boom", 2.0))
    completions = ["ok 1", "boom", "ok 3"]
    zero = _score(fns, completions, on_failure="zero")
    excl = _score(fns, completions, on_failure="exclude")
    assert zero.rewards == [3.0, 0.0, 9.0]
    assert excl.rewards == [3.0, None, 9.0]
    assert zero.failures == excl.failures == {"exception": 1}
    assert zero.parts["reward_plugins:good"] == [1.0, 0.0, 3.0]


def test_all_faults_together_exact_counts():
    fns = _fns(
        ("reward_plugins:raises_on_boom", 1.0),
        ("reward_plugins:hangs_on_hang", 1.0),
        ("reward_plugins:nan_on_nan", 1.0),
        ("reward_plugins:str_on_str", 1.0),
        ("reward_plugins:none_on_none", 1.0),
    )
    completions = ["ok 1", "boom", "hang", "nan", "str", "none", "ok 2"]
    res = _score(fns, completions, timeout_s=0.5, on_failure="exclude")
    assert res.failures == {"exception": 1, "timeout": 1, "nan": 1, "type": 1}
    assert res.none_count == 1
    assert res.rewards == [5.0, None, None, None, None, None, 10.0]


def test_async_and_columns():
    res = _score(_fns(("reward_plugins:async_good", 1.0)), ["ok 2", "ok 3"])
    assert res.rewards == [2.0, 3.0] and res.failures == {}
    res = _score(_fns(("reward_plugins:uses_answer", 1.0)), ["a", "b"], answer=["a", "c"])
    assert res.rewards == [1.0, 0.0]


def test_caller_errors_raise():
    fns = _fns(("reward_plugins:good", 1.0))
    with pytest.raises(ValueError, match="column 'answer'"):
        score_batch(fns, ["q"], ["ok 1"], {"answer": []}, timeout_s=1, on_failure="zero")
    with pytest.raises(ValueError, match="on_failure"):
        score_batch(fns, ["q"], ["ok 1"], {}, timeout_s=1, on_failure="drop")
    assert score_batch(fns, [], [], {}, timeout_s=1, on_failure="zero").rewards == []


def test_call_with_timeout():
    assert call_with_timeout(lambda x: x + 1, {"x": 1}, 1.0) == 2
    with pytest.raises(TimeoutError):
        call_with_timeout(lambda secs: time.sleep(secs), {"secs": 5}, 0.1)
    with pytest.raises(RuntimeError, match="SystemExit"):
        call_with_timeout(lambda: (_ for _ in ()).throw(SystemExit(3)), {}, 1.0)


def test_builtin_gsm8k_through_score_batch():
    fns = _fns(("gsm8k", 1.0), ("format", 0.5))
    completions = ["<think>9*2</think><answer>18</answer>", "the answer is 18", "<think>x</think><answer>17</answer>"]
    res = _score(fns, completions, answer=["#### 18"] * 3)
    assert res.rewards == [1.5, 1.0, 0.5]
    assert not math.isnan(sum(res.rewards))


# ---------------------------------------------------------------- Ray pool


def _groups(n: int, g: int, *, marker: str | None = None) -> list[Group]:
    groups = []
    for i in range(n):
        cols = {"marker": marker} if marker else {}
        prompt = Prompt(uid=i, text=f"Q{i}", token_ids=[1, 2], question=f"What is {i}+0?", answer=str(i), columns=cols)
        samples = [
            Sample(
                response_ids=[3],
                sampling_logprobs=[-0.1],
                text=f"<think>t</think><answer>{i if j % 2 == 0 else i + 1}</answer>",
                truncated=False,
                policy_version=0,
            )
            for j in range(g)
        ]
        groups.append(Group(prompt=prompt, samples=samples))
    return groups


def _cfg(names_weights, num_workers=2, **kw):
    return RewardConfig(
        num_workers=num_workers,
        functions=[RewardFunctionConfig(name=n, weight=w) for n, w in names_weights],
        **kw,
    )


@pytest.mark.ray
def test_pool_scores_64_groups_with_2_workers(ray_local):
    from troupe.reward.pool import RewardPool

    pool = RewardPool(_cfg([("accuracy", 1.0), ("format", 0.5)]))
    assert [_named(ray_local, f"reward-worker-{i}") for i in range(2)] == [w._actor_id for w in pool.workers]
    try:
        groups = _groups(64, 8)
        t0 = time.perf_counter()
        refs = [pool.submit(groups[i : i + 8]) for i in range(0, 64, 8)]
        assert time.perf_counter() - t0 < 2.0  # submit does not wait for scoring
        scored = pool.get_flat(refs)
        assert [g.prompt.uid for g in scored] == list(range(64))
        for g in scored:
            assert g.rewards == [1.5, 0.5] * 4
            assert g.reward_parts["accuracy"] == [1.0, 0.0] * 4
            assert g.reward_parts["format"] == [1.0] * 8
            assert g.failures == {}
        again = pool.score_now(groups)
        assert [g.rewards for g in again] == [g.rewards for g in scored]
        assert groups[0].rewards == []  # the caller's objects are not modified
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_pool_survives_worker_process_crash(ray_local, tmp_path):
    from troupe.reward.pool import RewardPool

    marker = tmp_path / "crashed"
    pool = RewardPool(_cfg([("reward_plugins:crash_once", 1.0)]))
    try:
        groups = _groups(64, 4, marker=str(marker))
        refs = [pool.submit(groups[i : i + 16]) for i in range(0, 64, 16)]
        scored = pool.get_flat(refs, timeout=60)
        assert marker.exists()  # a worker really died
        assert len(scored) == 64
        assert all(g.rewards == [1.0] * 4 for g in scored)
        assert sum(g.failures.get("worker_restart", 0) for g in scored) == 1
        assert all(set(g.failures) <= {"worker_restart"} for g in scored)
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_pool_replaces_killed_actor_and_resubmits(ray_local):
    from troupe.reward.pool import RewardPool

    ray = ray_local

    pool = RewardPool(_cfg([("reward_plugins:slow", 1.0)], num_workers=1))
    try:
        ref = pool.submit(_groups(20, 2))  # ~1 s of work
        time.sleep(0.3)
        ray.kill(pool.workers[0], no_restart=True)
        scored = pool.get(ref, timeout=60)
        assert len(scored) == 20 and all(g.rewards == [1.0, 1.0] for g in scored)
        assert scored[0].failures.get("worker_restart") == 1
        assert pool.restarts == 1
        assert pool.score_now(_groups(2, 2))[0].rewards == [1.0, 1.0]  # the new worker keeps serving
        # the replacement is named for the Ray dashboard too: reward-worker-0, or reward-worker-0.N while
        # Ray still holds the dead actor's name
        names = [a for a in ("reward-worker-0", "reward-worker-0.1") if _named(ray, a) == pool.workers[0]._actor_id]
        assert len(names) == 1
    finally:
        pool.shutdown()


def _named(ray, name):
    try:
        return ray.get_actor(name)._actor_id
    except ValueError:
        return None


def _text_groups(texts_per_group: list[list[str]]) -> list[Group]:
    return [
        Group(
            prompt=Prompt(uid=i, text="q", token_ids=[], question="q", answer="0"),
            samples=[Sample([], [], t, False, 0) for t in texts],
        )
        for i, texts in enumerate(texts_per_group)
    ]


@pytest.mark.ray
def test_pool_recovers_from_wedged_worker(ray_local):
    """A reward stuck in C code holding the GIL (no thread timeout can fire) wedges its worker;
    the heartbeat notices, the batch is retried once on a fresh worker, then scored as failed,
    and the batch queued behind it on the same worker is re-scored normally."""
    from troupe.reward.pool import RewardPool

    pool = RewardPool(_cfg([("reward_plugins:wedge_on_wedge", 1.0)], num_workers=1, timeout_s=0.5), heartbeat_s=1.0)
    try:
        bad = pool.submit(_text_groups([["ok 1", "wedge"], ["ok 2", "ok 3"]]))
        good = pool.submit(_text_groups([["ok 4", "ok 5"]]))  # queued behind it on the same worker
        t0 = time.perf_counter()
        failed = pool.get(bad, timeout=120)
        assert time.perf_counter() - t0 < 60
        assert [g.rewards for g in failed] == [[0.0, 0.0], [0.0, 0.0]]
        assert failed[0].failures == {"timeout": 2, "worker_wedged": 1}
        assert failed[1].failures == {"timeout": 2}
        assert failed[0].reward_parts == {"reward_plugins:wedge_on_wedge": [None, None]}
        scored = pool.get(good, timeout=120)
        assert scored[0].rewards == [4.0, 5.0]
        assert scored[0].failures == {"worker_restart": 1}
        assert pool.restarts == 2
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_pool_scores_only_the_worker_killing_group_as_failed(ray_local):
    """A reward function that kills the process on one input, every time: the batch is tried on
    two restarted processes and a replacement worker, then group by group; only the killing group
    is scored as failed, the others keep their scores, and the run goes on."""
    from troupe.reward.pool import RewardPool

    pool = RewardPool(_cfg([("reward_plugins:kill_on_kill", 1.0)], num_workers=1))
    try:
        bad = pool.submit(_text_groups([["ok", "ok"], ["ok", "kill"], ["ok", "ok"]]))
        out = pool.get(bad, timeout=300)
        assert [g.rewards for g in out] == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
        assert out[1].failures == {"exception": 2, "worker_died": 1}
        assert out[0].failures == {} and out[2].failures.keys() <= {"worker_restart"}
        assert pool.score_now(_text_groups([["ok", "ok"]]))[0].rewards == [1.0, 1.0]  # still serving
    finally:
        pool.shutdown()


@pytest.mark.ray
def test_pool_rejects_bad_spec_before_starting(ray_local):
    from troupe.reward.pool import RewardPool

    with pytest.raises(ValueError, match="no_such_module_xyz"):
        RewardPool(_cfg([("no_such_module_xyz:f", 1.0)]))


# ---------------------------------------------------------------- RewardSet and the worker, in-process


def test_reward_set_loads_once_and_scores():
    rs = RewardSet(_cfg([("reward_plugins:good", 1.0), ("reward_plugins:good", 2.0)], timeout_s=3.0,
                        on_failure="exclude"))
    assert rs.names == ["reward_plugins:good", "reward_plugins:good#2"]
    assert rs.process == frozenset() and rs.timeout_s == 3.0 and rs.on_failure == "exclude"
    res = rs.score(["q", "q"], ["ok 1", "ok 2"], {"answer": ["0", "0"]})
    assert res.rewards == [3.0, 6.0] and res.step_rewards == []
    with pytest.raises(ValueError, match="no module named"):
        RewardSet(_cfg([("no_such_module_xyz:f", 1.0)]))


def test_reserved_columns_are_rejected_and_skipped():
    assert set(RESERVED_COLUMNS) == {"prompts", "completions", "steps"}
    fns = _fns(("reward_plugins:good", 1.0))
    for name in RESERVED_COLUMNS:
        with pytest.raises(ValueError, match="reserved"):
            score_batch(fns, ["q"], ["ok 1"], {name: [1]}, timeout_s=1, on_failure="zero")
    rows = [{"steps": 1, "answer": "a", "b": 2}, {"c": 3, "prompts": 4}]
    assert column_names(rows) == ["b", "c"]
    assert column_names(rows, skip={"c"}) == ["b"]
    assert reward_columns(["x", "y"], rows, ["b", "c"]) == {"answer": ["x", "y"], "b": [2, None], "c": [None, 3]}


def test_worker_in_process_passes_columns():
    from troupe.reward.pool import RewardWorker

    groups = _groups(1, 2, marker="m") + _groups(1, 2)  # the second group has no marker column
    groups[0].prompt.columns["steps"] = "not a column"  # reserved: skipped, not an error
    worker = RewardWorker(_cfg([("accuracy", 1.0), ("reward_plugins:has_marker", 2.0)]))
    assert worker.ping() == ["accuracy", "reward_plugins:has_marker"]
    scored = worker.score(groups)
    assert [g.rewards for g in scored] == [[3.0, 2.0], [1.0, 0.0]]
    assert all(g.failures == {} for g in scored)


# ---------------------------------------------------------------- troupe score (in-process)


def test_score_cli_rewards_and_out(tmp_path, capsys):
    from troupe.cluster.score_cli import main

    inp = tmp_path / "in.jsonl"
    rows = [
        {"prompt": "2+2?", "completion": "<think>x</think><answer>4</answer>", "reference": "4"},
        {"prompt": "2+2?", "completion": "<answer>5</answer>", "reference": "4"},
        {"prompt": "2+2?", "completion": "boom", "reference": "4"},
    ]
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    rc = main([str(inp), "--rewards", "accuracy,format:0.5,reward_plugins:raises_on_boom:0", "--out", str(out)])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in recs] == [0, 1, 2]
    assert [r["reward"] for r in recs] == [1.5, 0.0, 0.0]
    assert recs[0]["parts"] == {"accuracy": 1.0, "format": 1.0, "reward_plugins:raises_on_boom": 0.0}
    assert recs[2]["failure"] == {"reward_plugins:raises_on_boom": "exception"}
    assert recs[0]["failure"] is None
    summary = capsys.readouterr().out
    assert "rows: 3" in summary and "mean reward: 0.5000" in summary and "exception=1" in summary


def test_score_cli_preset_and_config(tmp_path, capsys):
    from troupe.cluster.score_cli import main
    from troupe.rollout.data import load_preset

    data = load_preset("gsm8k", "test", max_rows=4)
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"index": i, "completion": r["solution"] if i % 2 == 0 else "no"}) + "\n" for i, r in enumerate(data))
    )
    assert main([str(inp), "--preset", "gsm8k"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x)["reward"] for x in lines] == [1.0, 0.0, 1.0, 0.0]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("reward:\n  functions:\n    - {name: gsm8k, weight: 2.0}\n  timeout_s: 5\n")
    assert main([str(inp), "--preset", "gsm8k", "--config", str(cfg), "--out", str(tmp_path / "o.jsonl")]) == 0
    assert json.loads((tmp_path / "o.jsonl").read_text().splitlines()[0])["reward"] == 2.0


@pytest.mark.parametrize(
    "content, args, message",
    [
        (None, ["--rewards", "accuracy"], "no such input file"),
        ("{bad json\n", ["--rewards", "accuracy"], ":1: invalid JSON"),
        ('{"completion": 5, "reference": "1"}\n', ["--rewards", "accuracy"], "'completion' (completion) must be a string"),
        ('{"completion": "x"}\n', ["--rewards", "accuracy"], ":1: missing field 'answer'"),
        ('{"completion": "x", "reference": "1"}\n', ["--rewards", "nope_mod:f"], "no module named 'nope_mod'"),
        ('{"completion": "x", "reference": "1"}\n', [], "give --rewards, --config or --preset"),
        ('{"completion": "x", "index": 99999}\n', ["--preset", "math500"], "index 99999 is not a row"),
    ],
)
def test_score_cli_bad_input_exit_2(tmp_path, capsys, content, args, message):
    from troupe.cluster.score_cli import main

    inp = tmp_path / "in.jsonl"
    if content is not None:
        inp.write_text(content)
    assert main([str(inp), *args]) == 2
    assert message in capsys.readouterr().err
