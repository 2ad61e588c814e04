"""Per-row routing, ``prompt_texts`` and reward models in the reward path, in-process (no Ray cluster).

The reward functions used here are defined in this file and loaded by path
(``/.../test_reward_routing_cpu.py:<fn>``), as a user plugin would be. The reward model is a tiny
Qwen2 sequence classifier built once per module (``troupe.learner.tiny_model``), a few seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from troupe.configs.schema import RewardConfig, RewardFunctionConfig, RewardModelConfig
from troupe.core.types import Group, Prompt, Sample
from troupe.reward.scoring import (
    RESERVED_KEYWORDS,
    RewardSet,
    check_reward_config,
    column_names,
    route_matches,
    score_batch,
)

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- plugin reward functions


def _value(completion: str) -> float:
    parts = str(completion).split()
    return float(parts[1]) if len(parts) > 1 and parts[0] == "ok" else 0.0


def good(prompts, completions, **kwargs):
    """The number after 'ok'."""
    return [_value(c) for c in completions]


def ten_times(prompts, completions, **kwargs):
    """10 x the number after 'ok'."""
    return [10 * _value(c) for c in completions]


def raises_on_boom(prompts, completions, **kwargs):
    if any(c == "boom" for c in completions):
        raise RuntimeError("boom")
    return [_value(c) for c in completions]


def none_on_none(prompts, completions, **kwargs):
    return [None if c == "none" else _value(c) for c in completions]


def echo_prompt_len(prompts, completions, prompt_texts=None, **kwargs):
    """len(prompt_texts[i]) (raises without prompt_texts)."""
    assert prompt_texts is not None and len(prompt_texts) == len(completions)
    return [float(len(t)) for t in prompt_texts]


def echo_prompt_len_one_at_a_time(prompts, completions, prompt_texts=None, **kwargs):
    """Refuses batches, so score_batch falls back to per-sample calls (each gets its one-element slice)."""
    if len(completions) != 1 or len(prompt_texts) != 1:
        raise RuntimeError("one at a time")
    return [float(len(prompt_texts[0]))]


def per_step_ones(prompts, completions, steps, **kwargs):
    """Process function: 1.0 per step."""
    return [[1.0] * len(st) for st in steps]


def _spec(fn: str) -> str:
    return f"{HERE}:{fn}"


def _fn(fn: str, weight: float = 1.0, tasks=None, **kw) -> RewardFunctionConfig:
    return RewardFunctionConfig(name=_spec(fn), weight=weight, tasks=tasks, **kw)


# ---------------------------------------------------------------- prompt_texts


def test_prompt_texts_reach_every_function_batch_and_per_sample():
    rs = RewardSet(RewardConfig(functions=[_fn("echo_prompt_len"), _fn("echo_prompt_len_one_at_a_time", 0.0),
                                           _fn("good", 0.5)]))
    texts = ["<|user|>What is 1+1?<|assistant|>", "Q: x\nA:"]
    res = rs.score(["What is 1+1?", "x"], ["ok 2", "ok 4"], {"answer": ["2", "4"]}, prompt_texts=texts)
    assert res.failures == {} and res.messages.keys() == {_spec("echo_prompt_len_one_at_a_time")}
    assert res.parts[_spec("echo_prompt_len")] == [float(len(t)) for t in texts]
    assert res.parts[_spec("echo_prompt_len_one_at_a_time")] == [float(len(t)) for t in texts]  # per-sample slices
    assert res.rewards == [len(texts[0]) + 1.0, len(texts[1]) + 2.0]
    # without prompt_texts the keyword is not passed: the echo function fails, the others score
    res = rs.score(["q"], ["ok 2"], {"answer": ["2"]})
    assert res.failures == {"exception": 2} and res.parts[_spec("good")] == [2.0]


def test_prompt_texts_is_a_reserved_keyword():
    assert "prompt_texts" in RESERVED_KEYWORDS
    fns = [("good", good, 1.0)]
    with pytest.raises(ValueError, match="reserved"):
        score_batch(fns, ["q"], ["ok 1"], {"prompt_texts": ["x"]}, timeout_s=1, on_failure="zero")
    with pytest.raises(ValueError, match="2 prompt_texts for 1 completions"):
        score_batch(fns, ["q"], ["ok 1"], {}, timeout_s=1, on_failure="zero", prompt_texts=["a", "b"])
    assert column_names([{"prompt_texts": 1, "task": "math"}]) == ["task"]


def test_worker_passes_the_templated_prompt():
    from troupe.reward.pool import RewardWorker

    g = Group(Prompt(uid=0, text="SYSTEM\nQ: 2+2?\nA:", token_ids=[], question="2+2?", answer="4"),
              [Sample([], [], "ok 1", False, 0)] * 2)
    scored = RewardWorker(RewardConfig(functions=[_fn("echo_prompt_len")])).score([g])
    assert scored[0].rewards == [float(len("SYSTEM\nQ: 2+2?\nA:"))] * 2


# ---------------------------------------------------------------- routing


def test_route_matches():
    assert route_matches(None, None) and route_matches(None, "x")
    assert route_matches(frozenset({"math"}), "math") and not route_matches(frozenset({"math"}), "general")
    assert not route_matches(frozenset({"math"}), None)
    assert route_matches(frozenset({"1"}), 1)  # compared as text


def _routed_cfg(**kw) -> RewardConfig:
    return RewardConfig(
        route_by="task",
        functions=[
            _fn("raises_on_boom", 1.0, tasks=["math"]),       # rule reward for math rows
            _fn("ten_times", 1.0, tasks=["general"]),         # stands in for the preference model
            _fn("none_on_none", 0.5),                          # every row
        ],
        **kw,
    )


def test_routing_assembles_parts_rewards_and_failures():
    rs = RewardSet(_routed_cfg())
    math_f, gen_f, all_f = rs.names
    completions = ["ok 1", "ok 2", "boom", "ok 3", "none", "ok 4"]
    tasks = ["math", "general", "math", None, "general", "other"]
    res = rs.score(["q"] * 6, completions, {"answer": ["0"] * 6, "task": tasks})
    assert res.parts[math_f] == [1.0, None, None, None, None, None]
    assert res.parts[gen_f] == [None, 20.0, None, None, 0.0, None]
    assert res.parts[all_f] == [1.0, 2.0, 0.0, 3.0, None, 4.0]
    assert res.errors[math_f] == [None, None, "exception", None, None, None]
    assert res.applied == {
        math_f: [True, False, True, False, False, False],
        gen_f: [False, True, False, False, True, False],
        all_f: [True] * 6,
    }
    # reward = sum over the applicable functions only; the boom sample's failed part counts 0
    assert res.rewards == [1.5, 21.0, 0.0, 1.5, None, 2.0]
    assert res.failures == {"exception": 1}  # not applying is not a failure
    assert res.none_count == 1  # the 'none' general row: none_on_none returned None
    assert "boom" in res.messages[math_f]


def test_routing_exclude_and_unrouted():
    cfg = RewardConfig(route_by="task", on_failure="exclude",
                       functions=[_fn("raises_on_boom", tasks=["math"]), _fn("ten_times", tasks=["general"])])
    rs = RewardSet(cfg)
    res = rs.score(["q"] * 4, ["ok 1", "boom", "ok 2", "ok 3"], {"answer": ["0"] * 4,
                                                                  "task": ["math", "math", "general", None]})
    assert res.rewards == [1.0, None, 20.0, None]
    assert res.failures == {"exception": 1, "unrouted": 1}
    assert all(res.parts[name][3] is None and not res.applied[name][3] for name in rs.names)
    # no route column at all: only functions without tasks apply (none here)
    res = rs.score(["q"], ["ok 1"], {"answer": ["0"]})
    assert res.rewards == [None] and res.failures == {"unrouted": 1}


def test_routing_off_without_tasks_or_route_by_is_unchanged():
    plain = RewardSet(RewardConfig(functions=[_fn("good"), _fn("ten_times", 0.5)]))
    routed = RewardSet(RewardConfig(route_by="task", functions=[_fn("good"), _fn("ten_times", 0.5)]))
    cols = {"answer": ["0", "0"], "task": ["math", None]}
    a, b = plain.score(["q", "q"], ["ok 1", "ok 2"], cols), routed.score(["q", "q"], ["ok 1", "ok 2"], cols)
    assert a == b and a.applied == {} and a.rewards == [6.0, 12.0]


def test_select_splits_counts_exactly():
    rs = RewardSet(_routed_cfg())
    tasks = ["math", "math", "general", "general", "other", None]
    res = rs.score(["q"] * 6, ["ok 1", "boom", "none", "ok 2", "none", "ok 1"], {"answer": ["0"] * 6, "task": tasks})
    first, second = res.select(0, 3), res.select(3, 6)
    assert first.rewards + second.rewards == res.rewards
    assert first.failures == {"exception": 1} and first.none_count == 1
    assert second.failures == {} and second.none_count == 1
    for name in rs.names:
        assert first.parts[name] + second.parts[name] == res.parts[name]
    unrouted = RewardSet(RewardConfig(route_by="task", functions=[_fn("good", tasks=["math"])]))
    res = unrouted.score(["q"] * 3, ["ok 1"] * 3, {"answer": ["0"] * 3, "task": ["math", "x", "y"]})
    assert res.failures == {"unrouted": 2}
    assert res.select(0, 1).failures == {} and res.select(1, 3).failures == {"unrouted": 2}


def test_routing_with_a_process_function():
    cfg = RewardConfig(route_by="task", step_delimiter=",",
                       functions=[_fn("per_step_ones", 1.0, tasks=["math"], kind="process"), _fn("good", 2.0)])
    rs = RewardSet(cfg)
    res = rs.score(["q"] * 2, ["ok 1 ,b,c", "ok 3 ,e"], {"answer": ["0"] * 2, "task": ["math", "general"]})
    assert res.step_rewards[0] == [1.0, 1.0, 3.0]  # process per step + outcome on the last step
    assert math.isnan(res.step_rewards[1][0]) and res.step_rewards[1][1] == 6.0  # no process fn: steps unscored
    assert res.rewards == [3.0, 6.0]


def test_worker_routes_groups_in_one_batch():
    from troupe.reward.pool import RewardWorker

    def group(uid: int, task, texts: list[str]) -> Group:
        cols = {} if task is None else {"task": task}
        return Group(Prompt(uid=uid, text=f"T{uid}", token_ids=[], question="q", answer="0", columns=cols),
                     [Sample([], [], t, False, 0) for t in texts])

    groups = [group(0, "math", ["ok 1", "boom"]), group(1, "general", ["ok 2", "none"]),
              group(2, None, ["ok 3", "ok 4"])]
    worker = RewardWorker(_routed_cfg())
    out = worker.score(groups)
    math_f, gen_f, all_f = worker.ping()
    assert [g.rewards for g in out] == [[1.5, 0.0], [21.0, None], [1.5, 2.0]]
    assert [g.failures for g in out] == [{"exception": 1}, {"none": 1}, {}]
    assert out[1].reward_parts[math_f] == [None, None] and out[1].reward_parts[gen_f] == [20.0, 0.0]


# ---------------------------------------------------------------- reward models




def test_reward_set_scores_with_a_reward_model_on_the_templated_prompt(rm_dir):
    from troupe.reward.model import RewardModelScorer, reward_text

    cfg = RewardConfig(functions=[_fn("good")], models=[RewardModelConfig(path=rm_dir, name="rm", weight=2.0,
                                                                          batch_size=2)])
    rs = RewardSet(cfg)
    assert rs.names == [_spec("good"), "rm"] and rs.models == frozenset({"rm"})
    prompt_texts = ["<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", "Q: poem?\nA:", "Q: 7?\nA:"]
    questions = ["What is 2+3?", "poem?", "7?"]
    completions = ["ok 5", "ok 1 the sea", "<think>x</think><answer>7</answer>"]
    res = rs.score(questions, completions, {"answer": ["5", "", "7"]}, prompt_texts=prompt_texts)
    assert res.failures == {}

    ref = RewardModelScorer(rm_dir, batch_size=2)
    eos = ref.tokenizer.eos_token
    expected = ref.score_texts([reward_text(p, c, eos) for p, c in zip(prompt_texts, completions)])
    assert res.parts["rm"] == pytest.approx(expected, abs=1e-5)
    on_question = ref.score_texts([reward_text(q, c, eos) for q, c in zip(questions, completions)])
    assert res.parts["rm"] != pytest.approx(on_question, abs=1e-5)  # the templated prompt, not the question
    assert res.rewards == pytest.approx([_value(c) + 2.0 * r for c, r in zip(completions, expected)])


def test_worker_with_a_model_scores_the_whole_batch_at_once(rm_dir):
    from troupe.reward.pool import RewardWorker

    calls = []
    cfg = RewardConfig(route_by="task", functions=[],
                       models=[RewardModelConfig(path=rm_dir, name="rm", batch_size=4, tasks=["general"])])
    worker = RewardWorker(cfg)
    scorer = worker._rewards.fns[0][1]
    inner = scorer.score_texts
    scorer.score_texts = lambda texts: calls.append(len(texts)) or inner(texts)  # count forward batches

    def group(uid, task, texts):
        return Group(Prompt(uid=uid, text=f"Prompt {uid}: ", token_ids=[], question="q", answer="0",
                            columns={"task": task}), [Sample([], [], t, False, 0) for t in texts])

    groups = [group(0, "general", ["a b", "c"]), group(1, "math", ["d", "e"]), group(2, "general", ["f", "g h"])]
    out = worker.score(groups)
    assert calls == [4]  # both general groups' samples in one call (the math group is not routed here)
    assert out[1].rewards == [None, None] and out[1].failures == {"unrouted": 2}
    assert out[0].failures == {} and out[2].failures == {}
    alone = RewardWorker(cfg).score([group(2, "general", ["f", "g h"])])
    assert out[2].rewards == pytest.approx(alone[0].rewards, abs=1e-5)


def test_driver_check_does_not_load_weights(tmp_path, rm_dir):
    cfg = RewardConfig(functions=[_fn("good")], models=[RewardModelConfig(path=str(tmp_path / "nope"), name="rm")])
    with pytest.raises(ValueError, match=r"reward\.models\.0\.path: .*nope.*no config\.json"):
        check_reward_config(cfg)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    cfg = RewardConfig(functions=[_fn("good")], models=[RewardModelConfig(path=rm_dir, name="a"),
                                                        RewardModelConfig(path=str(tmp_path / "bad"), name="b")])
    with pytest.raises(ValueError, match=r"reward\.models\.1\.path: cannot read"):
        check_reward_config(cfg)
    # a folder with only a config passes the cheap check (weights are never read in the driver)
    (tmp_path / "only_config").mkdir()
    (tmp_path / "only_config" / "config.json").write_text(Path(rm_dir, "config.json").read_text())
    cfg = RewardConfig(functions=[_fn("good")], models=[RewardModelConfig(path=str(tmp_path / "only_config"))])
    assert check_reward_config(cfg) == [_spec("good"), "rm"]
    with pytest.raises(ValueError, match="only_config"):
        RewardSet(cfg)  # loading it for real fails, naming the folder


def test_model_timeout_is_not_retried_per_sample():
    import threading
    import time

    release = threading.Event()

    def stuck(prompts, completions, **kwargs):
        release.wait(5)
        return [1.0] * len(completions)

    t0 = time.perf_counter()
    res = score_batch([("m", stuck, 1.0)], ["q"] * 4, ["a"] * 4, {}, timeout_s=0.3, on_failure="zero",
                      stop_on_timeout={"m"})
    release.set()
    assert time.perf_counter() - t0 < 2.0  # one batch timeout, no 4 per-sample ones
    assert res.failures == {"timeout": 4} and res.rewards == [0.0] * 4


def test_troupe_score_with_a_reward_model_uses_prompt_text(tmp_path, rm_dir, capsys):
    """`troupe score --config` with reward.models: the model scores prompt_text + completion, routed by task."""
    import json

    import yaml

    from troupe.cluster.score_cli import main as score_main
    from troupe.reward.model import RewardModelScorer

    (tmp_path / "rm.yaml").write_text(yaml.safe_dump({"reward": {
        "functions": [{"name": "accuracy", "tasks": ["math"]}], "route_by": "task",
        "models": [{"path": rm_dir, "name": "rm", "weight": 2.0, "normalize": False, "tasks": ["general"]}]}}))
    rows = [{"prompt": "1+2", "prompt_text": "Compute 1+2.\n", "completion": "<answer>3</answer>", "answer": "3",
             "task": "math"},
            {"prompt": "hi", "prompt_text": "Say hi.\n", "completion": "hello", "answer": "", "task": "general"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score_main([str(tmp_path / "in.jsonl"), "--config", str(tmp_path / "rm.yaml"),
                       "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
    expected = RewardModelScorer(rm_dir, normalize=False)(["hi"], ["hello"], prompt_texts=["Say hi.\n"])[0]
    assert out[0]["parts"] == {"accuracy": 1.0, "rm": None} and out[0]["reward"] == 1.0
    assert out[1]["parts"]["accuracy"] is None
    assert out[1]["parts"]["rm"] == pytest.approx(expected, abs=1e-5)
    assert out[1]["reward"] == pytest.approx(2 * expected, abs=1e-5)
