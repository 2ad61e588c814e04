"""reward/passk.py: pass@k and maj@k against hand counts, accuracy from any named reward function."""

from __future__ import annotations

from math import comb

import pytest

from troupe.core.types import Group, Prompt, Sample
from troupe.reward.passk import accuracy_function, answer_key, eval_metrics, maj_at_k, pass_at_k


def test_pass_at_k_hand_counts():
    # n=4, c=1: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6 = 1/2; pass@4 = 1
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 1, 4) == 1.0
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(1, 1, 1) == 1.0
    for n, c, k in [(16, 3, 4), (64, 5, 16), (10, 9, 1)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


def test_answer_key_compares_numbers_by_value():
    assert answer_key("<answer>1,000</answer>") == answer_key("so \\boxed{1000.0}") == "=1000"
    assert answer_key("<answer> x +  1 </answer>") == "x + 1"
    assert answer_key("no answer here") is None and answer_key("<answer> </answer>") is None


def test_maj_at_k_hand_counts():
    ans = ["=3", "=3", "=4", None, "=4", "=4", "=5", "=5"]
    ok = [False, False, True, False, True, True, False, False]
    # k=8: votes 3:2, 4:3, 5:2 -> "=4", correct
    assert maj_at_k(ans, ok, 8) == 1.0
    # k=4: chunk 1 [3,3,4,-] -> 3 wrong; chunk 2 [4,4,5,5] tie -> 4 (seen first) right
    assert maj_at_k(ans, ok, 4) == 0.5
    # k=1: each sample on its own; a None chunk scores 0 -> 3 correct of 8
    assert maj_at_k(ans, ok, 1) == pytest.approx(3 / 8)
    # k=3: chunks [3,3,4] wrong, [-,4,4] right; leftovers [5,5] unused
    assert maj_at_k(ans, ok, 3) == 0.5
    with pytest.raises(ValueError):
        maj_at_k(ans, ok[:-1], 2)


def _group(texts, scores, name="exact"):
    p = Prompt(uid=0, text="q", token_ids=[1, 2], question="q", answer="a")
    return Group(prompt=p, samples=[Sample(response_ids=[3], sampling_logprobs=[-1.0], text=t, truncated=False,
                                           policy_version=0) for t in texts],
                 rewards=[0.0 if s is None else s for s in scores], reward_parts={name: list(scores)})


def test_eval_metrics_with_a_plugin_reward():
    g1 = _group(["<answer>7</answer>", "<answer>7</answer>", "<answer>8</answer>", "<answer>8</answer>"], [1.0, 1.0, 0.0, 0.0])
    g2 = _group(["<answer>1</answer>", "<answer>2</answer>", "<answer>2</answer>", "<answer>3</answer>"], [0.0, 0.0, 0.0, None])
    m = eval_metrics([g1, g2], "exact", ks=(1, 2, 4))
    assert m["eval/accuracy"] == pytest.approx(2 / 8)
    assert m["eval/pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["eval/pass@2"] == pytest.approx((1 - comb(2, 2) / comb(4, 2)) / 2)
    assert m["eval/pass@4"] == pytest.approx(0.5)
    # g1 k=2: chunks [7,7] right, [8,8] wrong -> 0.5; k=4: tie 7/8 -> 7 right -> 1; g2 always wrong
    assert m["eval/maj@2"] == pytest.approx(0.25) and m["eval/maj@4"] == pytest.approx(0.5)
    assert m["eval/samples_per_prompt"] == 4
    # correct_at lowers the bar; no accuracy function: nothing reported
    assert eval_metrics([g2], "exact", correct_at=-1.0)["eval/accuracy"] == pytest.approx(3 / 4)
    assert eval_metrics([g1], None) == {}


def test_accuracy_function_choice():
    assert accuracy_function(["format", "gsm8k"]) == "gsm8k"
    assert accuracy_function(["format", "exact"]) is None
    assert accuracy_function(["format", "exact"], "exact") == "exact"
    with pytest.raises(ValueError, match="eval.accuracy 'nope'"):
        accuracy_function(["exact"], "nope")
