"""Reward models in their own Ray actors next to the rule functions (``troupe.reward.router``), on a
real local Ray cluster: a mixed-task batch routed to the rules lane and a model lane, a killed
reward-model actor replaced while its batch is scored, and a model that fails to load.

The reward model is a tiny Qwen2 sequence classifier built once per module (a few seconds);
each reward-model actor imports torch and transformers when it starts (about 10 s here).
"""

from __future__ import annotations

import shutil
import time

import pytest

from troupe.configs.schema import RewardConfig, RewardFunctionConfig, RewardModelConfig
from troupe.core.types import Group, Prompt, Sample

pytestmark = [pytest.mark.slow, pytest.mark.ray]

G = 3




def _cfg(rm_path: str, **model_kw) -> RewardConfig:
    return RewardConfig(
        route_by="task",
        functions=[RewardFunctionConfig(name="accuracy", tasks=["math"])],
        models=[RewardModelConfig(path=rm_path, name="rm", weight=2.0, batch_size=4, num_cpus=1.0, tasks=["general"],
                                  **model_kw)],
    )


def _group(uid: int, task) -> Group:
    cols = {} if task is None else {"task": task}
    prompt = Prompt(uid=uid, text=f"<|im_start|>user\nQuestion {uid}<|im_end|>\n<|im_start|>assistant\n",
                    token_ids=[], question=f"Question {uid}", answer=str(uid), columns=cols)
    texts = [f"<think>x</think><answer>{uid + (j % 2)}</answer> poem {j}" for j in range(G)]
    return Group(prompt, [Sample([], [], t, False, 0) for t in texts])


def _expected_rm(rm_dir: str, g: Group) -> list[float]:
    from troupe.reward.model import RewardModelScorer, reward_text

    scorer = RewardModelScorer(rm_dir)
    return scorer.score_texts([reward_text(g.prompt.text, s.text, scorer.tokenizer.eos_token) for s in g.samples])


@pytest.fixture(scope="module")
def router(ray_local, rm_dir):
    from troupe.reward.router import RewardRouter

    r = RewardRouter(_cfg(rm_dir))
    yield r
    r.shutdown()


def test_router_scores_a_mixed_task_batch(router, rm_dir):
    assert set(router.lanes) == {"rules", "rm"} and router.num_workers == 2
    groups = [_group(0, "math"), _group(1, "general"), _group(2, None), _group(3, "math"), _group(4, "general")]
    ticket = router.submit(groups)
    out = router.get(ticket, timeout=120)
    assert [g.prompt.uid for g in out] == [0, 1, 2, 3, 4]
    for k in (0, 3):  # math: the rule reward only
        assert out[k].rewards == [1.0, 0.0, 1.0] and out[k].reward_parts == {"accuracy": [1.0, 0.0, 1.0],
                                                                             "rm": [None] * G}
        assert out[k].failures == {}
    for k in (1, 4):  # general: the reward model on the templated prompt + response
        expected = _expected_rm(rm_dir, groups[k])
        assert out[k].reward_parts["accuracy"] == [None] * G
        assert out[k].reward_parts["rm"] == pytest.approx(expected, abs=1e-5)
        assert out[k].rewards == pytest.approx([2.0 * r for r in expected], abs=1e-5)
        assert out[k].failures == {}
    assert out[2].rewards == [None] * G and out[2].failures == {"unrouted": G}  # no task column: no part applies
    assert out[2].reward_parts == {"accuracy": [None] * G, "rm": [None] * G}
    assert groups[1].rewards == [] and groups[2].failures == {}  # the caller's objects are untouched
    # a batch for one lane only still carries every part name
    only_math = router.get(router.submit([_group(5, "math")]), timeout=120)
    assert only_math[0].rewards == [1.0, 0.0, 1.0]
    assert only_math[0].reward_parts == {"accuracy": [1.0, 0.0, 1.0], "rm": [None] * G}
    assert router.restarts == 0


def test_killed_reward_model_actor_is_replaced(router, ray_local, rm_dir):
    from ray.exceptions import RayActorError

    ray = ray_local
    pool = router.lanes["rm"]
    victim = pool.workers[0]
    ray.kill(victim, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until it is really gone, so the batch below meets a dead actor
        try:
            ray.get(victim.ping.remote(), timeout=5)
        except RayActorError:
            break
        time.sleep(0.2)
    groups = [_group(10, "general"), _group(11, "math"), _group(12, "general")]
    out = router.get(router.submit(groups), timeout=180)
    assert router.restarts == 1 and pool.restarts == 1 and pool.workers[0] is not victim
    assert out[0].failures == {"worker_restart": 1} and out[1].failures == {} and out[2].failures == {}
    assert out[0].reward_parts["rm"] == pytest.approx(_expected_rm(rm_dir, groups[0]), abs=1e-5)
    assert out[1].rewards == [1.0, 0.0, 1.0]
    again = router.score_now([_group(13, "general")], timeout=120)  # the replacement keeps serving
    assert again[0].failures == {} and all(r is not None for r in again[0].rewards)


def test_model_that_fails_to_load_is_a_clear_error_at_start(ray_local, rm_dir, tmp_path):
    from troupe.reward.router import RewardRouter

    with pytest.raises(ValueError, match=r"reward\.models\.0\.path: .*no_such_model"):  # driver check, no actor
        RewardRouter(_cfg(str(tmp_path / "no_such_model")))
    broken = tmp_path / "broken_rm"
    broken.mkdir()
    shutil.copy(f"{rm_dir}/config.json", broken / "config.json")  # a config, but no weights nor tokenizer
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as exc:
        RewardRouter(_cfg(str(broken)))
    text = str(exc.value)
    assert "reward lane 'rm' (reward.models.0" in text and "broken_rm" in text
    assert "cannot load it as AutoModelForSequenceClassification" in text
    assert time.perf_counter() - t0 < 90


def test_rules_only_router_is_the_pool(ray_local):
    """Rule functions only: one lane, whose result comes back as the pool's; with routing, a group no
    function applies to is unrouted, and a batch scored as failed counts only the applicable parts."""
    from troupe.reward.router import RewardRouter

    plain = RewardRouter(RewardConfig(functions=[RewardFunctionConfig(name="accuracy"),
                                                 RewardFunctionConfig(name="format", weight=0.5)]))
    try:
        assert set(plain.lanes) == {"rules"} and plain.num_workers == 1
        out = plain.get(plain.submit([_group(0, "math"), _group(1, None)]), timeout=60)
        assert [g.rewards for g in out] == [[1.0, 0.0, 1.0]] * 2  # format: 0 (text after </answer>)
        assert out[0].reward_parts == {"accuracy": [1.0, 0.0, 1.0], "format": [0.0] * G}
        assert all(g.failures == {} for g in out) and plain.restarts == 0
    finally:
        plain.shutdown()
    routed = RewardRouter(RewardConfig(route_by="task", functions=[
        RewardFunctionConfig(name="accuracy", tasks=["math"]), RewardFunctionConfig(name="format", weight=0.5,
                                                                                      tasks=["math", "general"])]))
    try:
        out = routed.get(routed.submit([_group(0, "math"), _group(1, "general"), _group(2, "other")]), timeout=60)
        assert [g.rewards for g in out] == [[1.0, 0.0, 1.0], [0.0] * G, [None] * G]
        assert out[1].reward_parts == {"accuracy": [None] * G, "format": [0.0] * G}
        assert [g.failures for g in out] == [{}, {}, {"unrouted": G}]
        failed = routed.lanes["rules"]._failed_batch([_group(1, "general"), _group(2, "other")],
                                                     "exception", "worker_died")
        assert failed[0].failures == {"exception": G, "worker_died": 1} and failed[0].rewards == [0.0] * G
        assert failed[1].failures == {"unrouted": G} and failed[1].rewards == [None] * G
    finally:
        routed.shutdown()
