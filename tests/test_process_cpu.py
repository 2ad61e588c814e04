"""Process supervision (DeepSeekMath 4.1.3) from text to token advantages, without Ray or vLLM.

Covers the pieces ``algo.advantage: process`` wires together: cutting completions into steps,
mapping steps to token positions with the real (locally trained) tokenizer, process reward
functions through ``score_batch`` (combination, failures) and ``RewardSet`` (what the reward
worker scores with), collation into
``TrainBatch`` and the config rules. ``process_advantages`` itself is pinned in test_grpo_cpu.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from troupe.configs.algos import GRPOAdvantage, ProcessAdvantage
from troupe.configs.schema import ConfigError, RewardConfig, RewardFunctionConfig, load_config
from troupe.core.steps import decoded_prefix_lengths, split_steps, step_token_ends
from troupe.core.types import Group, Prompt, Sample
from troupe.demo import arith
from troupe.demo.arith import arith_steps
from troupe.learner import grpo
from troupe.learner.batch import collate_groups
from troupe.learner.step import group_signal, sequence_shaping, step_advantages
from troupe.reward.scoring import RewardSet, score_batch

NAN = math.nan
ARITH_STEPS = "troupe.demo.arith:arith_steps"  # the demo's process reward, by its config spec


# ---------------------------------------------------------------- cutting steps


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a\nb", [("a", 2), ("b", 3)]),
        ("a\n\nb", [("a", 2), ("b", 4)]),  # a blank piece is not a step
        ("a\n", [("a", 2)]),  # a trailing delimiter ends the last step
        ("  \n a", [(" a", 5)]),
        ("", [("", 0)]),  # an empty completion is one empty step
        (" \n ", [(" \n ", 3)]),
    ],
)
def test_split_steps(text, expected):
    assert split_steps(text, "\n") == expected


def test_split_steps_multichar_delimiter_and_errors():
    assert split_steps("x. y. z", ". ") == [("x", 3), ("y", 6), ("z", 7)]
    with pytest.raises(ValueError, match="non-empty"):
        split_steps("a", "")


def test_step_token_ends_hand_values():
    # 4 tokens whose decoded prefixes are 2, 5, 6, 9 characters long
    cum = [0, 2, 5, 6, 9]
    dl = cum.__getitem__
    assert step_token_ends(dl, 4, [5, 9]) == [1, 3]
    assert step_token_ends(dl, 4, [3, 6, 9]) == [1, 2, 3]
    assert step_token_ends(dl, 4, [1, 2, 9]) == [0, 0, 3]  # two steps may end on the same token
    assert step_token_ends(dl, 4, [4]) == [3]  # the last step always ends on the last token
    with pytest.raises(ValueError):
        step_token_ends(dl, 0, [1])
    with pytest.raises(ValueError):
        step_token_ends(dl, 4, [])


@pytest.fixture(scope="module")
def tokenizer():
    from troupe.learner.tiny_model import train_tokenizer

    rows = arith.arith_rows(300, 0, 99, "train")
    corpus = [arith.PROMPT_FORMAT.format(question=r["question"]) for r in rows] + [arith.worked_solution(r) for r in rows]
    return train_tokenizer(corpus)


def test_step_token_ends_with_real_tokenizer(tokenizer):
    """Each step ends on the first token whose decoded prefix covers the step and its delimiter."""
    rows = arith.arith_rows(50, 1, 999, "train")
    checked = 0
    for r in rows:
        text = arith.worked_solution(r, forget_carry=r["question"].endswith("7"))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        steps = split_steps(text, ",")
        ends = step_token_ends(decoded_prefix_lengths(tokenizer, ids).__getitem__, len(ids), [c for _, c in steps])
        assert len(ends) == len(steps) == text.count(",") + 1
        assert ends[-1] == len(ids) - 1  # EOS belongs to the last step
        for (_, c), e in zip(steps[:-1], ends[:-1]):
            upto = tokenizer.decode(ids[:e + 1], skip_special_tokens=True)
            before = tokenizer.decode(ids[:e], skip_special_tokens=True)
            assert upto.endswith(",") and len(upto) >= c > len(before)
            checked += 1
    assert checked >= 100


def test_decoded_prefix_lengths_match_prefix_decodes(tokenizer):
    """One incremental pass gives what decoding every prefix gives; inside a multi-byte character
    it waits for the character (prefix decodes show a 1-character replacement mark there)."""
    text = arith.worked_solution({"question": "67+48"}) + "\n" + arith.worked_solution({"question": "905+99"})
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    slow = [len(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids) + 1)]
    assert decoded_prefix_lengths(tokenizer, ids) == slow
    ids = tokenizer("1+1=2 é€😀", add_special_tokens=False)["input_ids"]
    fast = decoded_prefix_lengths(tokenizer, ids)
    slow = [len(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids) + 1)]
    assert fast[-1] == slow[-1] == len("1+1=2 é€😀")
    assert all(f <= s for f, s in zip(fast, slow)) and fast != slow  # the byte-level tokens split characters
    assert fast == sorted(fast)


# ---------------------------------------------------------------- scoring


def _steps_fn(values):
    def fn(prompts, completions, steps, **kw):
        return [values[c] for c in completions]
    return fn


def test_score_batch_combines_process_and_outcome():
    proc = _steps_fn({"a": [1.0, 0.0], "b": [None, 1.0, 1.0], "c": [0.5]})
    res = score_batch(
        [("prm", proc, 2.0), ("acc", lambda prompts, completions, **kw: [1.0, 0.0, 1.0], 0.5)],
        ["q"] * 3, ["a", "b", "c"], {}, timeout_s=5.0, on_failure="zero", process={"prm"},
        steps=[["s1", "s2"], ["s1", "s2", "s3"], ["s1"]],
    )
    # step_rewards = 2 * prm steps, the outcome part 0.5 * acc added to the last step
    assert res.step_rewards[0] == [2.0, 0.5]
    assert math.isnan(res.step_rewards[1][0]) and res.step_rewards[1][1:] == [2.0, 2.0]
    assert res.step_rewards[2] == [1.0 + 0.5]
    # the part score of a process function is the mean of its valid step scores
    assert res.parts["prm"] == [0.5, 1.0, 0.5]
    assert res.rewards == [2.0 * 0.5 + 0.5, 2.0 * 1.0 + 0.0, 2.0 * 0.5 + 0.5]
    assert res.failures == {}


def test_score_batch_process_failures_are_counted():
    proc = _steps_fn({"short": [1.0], "nan": [NAN, 1.0], "none": None, "allnone": [None, None], "ok": [0.0, 1.0]})
    outcome = lambda prompts, completions, **kw: [3.0] * len(completions)  # noqa: E731
    kw = dict(timeout_s=5.0, process={"prm"}, steps=[["x", "y"]] * 5)
    args = ([("prm", proc, 1.0), ("out", outcome, 1.0)], ["q"] * 5, ["short", "nan", "none", "allnone", "ok"], {})
    zero = score_batch(*args, on_failure="zero", **kw)
    assert zero.failures == {"type": 1, "nan": 1}
    assert zero.errors["prm"] == ["type", "nan", None, None, None]
    assert zero.none_count == 2  # None, and a list of only None, mean "no score"
    # a failed process part counts 0 on every step; the outcome still reaches the last step
    assert zero.step_rewards[:2] == [[0.0, 3.0], [0.0, 3.0]]
    assert zero.step_rewards[2:4] == [None, None]
    assert zero.step_rewards[4] == [0.0, 4.0]
    excl = score_batch(*args, on_failure="exclude", **kw)
    assert excl.step_rewards == [None, None, None, None, [0.0, 4.0]]
    assert excl.rewards == [None, None, None, None, 0.5 + 3.0]


def test_score_batch_process_caller_errors():
    f = _steps_fn({"a": [1.0]})
    with pytest.raises(ValueError, match="need steps"):
        score_batch([("prm", f, 1.0)], ["q"], ["a"], {}, timeout_s=1.0, on_failure="zero", process={"prm"})
    with pytest.raises(ValueError, match="not in fns"):
        score_batch([("prm", f, 1.0)], ["q"], ["a"], {}, timeout_s=1.0, on_failure="zero", process={"other"}, steps=[["a"]])


def test_arith_steps_scores_each_column():
    # 67+48: gold steps "7+8=15", "6+4+1=11", then the outcome
    good = arith.worked_solution({"question": "67+48"})
    sloppy = arith.worked_solution({"question": "67+48"}, forget_carry=True)  # 6+4=10, so 105
    extra = "<think>7+8=15,6+4+1=11,1=1,so 115</think><answer>115</answer>"
    cs = [good, sloppy, extra, ""]
    steps = [[t for t, _ in split_steps(c, ",")] for c in cs]
    assert arith_steps(["67+48"] * 4, cs, steps, answer=["115"] * 4) == [
        [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0], [0.0]]


def _group(question, answer, texts, tokenizer):
    prompt = Prompt(uid=0, text=question, token_ids=[1, 2, 3], question=question, answer=answer)
    samples = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ends = step_token_ends(decoded_prefix_lengths(tokenizer, ids).__getitem__, len(ids),
                               [c for _, c in split_steps(t, ",")])
        samples.append(Sample(ids, [-1.0] * len(ids), t, False, 0, ends))
    return Group(prompt=prompt, samples=samples)


def _score_group(g, functions):
    """Score ``g`` in-process with what a reward worker scores with (``RewardSet``, steps cut at
    ','; no Ray); ``functions``: (name, weight, kind) triples. Returns ``g`` filled in."""
    cfg = RewardConfig(step_delimiter=",", functions=[RewardFunctionConfig(name=n, weight=w, kind=k) for n, w, k in functions])
    n = len(g.samples)
    res = RewardSet(cfg).score([g.prompt.question] * n, [s.text for s in g.samples], {"answer": [g.prompt.answer] * n})
    g.rewards, g.reward_parts, g.step_rewards = res.rewards, res.parts, res.step_rewards
    return g


def _process_adv(step_rewards, step_ends, mask):
    """DeepSeekMath 4.1.3 advantages [B, T] of one batch (G = 2, default std/eps)."""
    inp = grpo.AdvantageInputs(torch.zeros(len(step_rewards)), mask, 2, step_rewards, step_ends)
    return grpo.compute_advantages(inp, ProcessAdvantage())


def test_worker_scores_steps_and_batch_gives_token_advantages(tokenizer):
    """RewardSet (the reward worker's scoring) -> TrainBatch -> process advantages, checked
    against a hand computation."""
    good = arith.worked_solution({"question": "67+48"})
    sloppy = arith.worked_solution({"question": "67+48"}, forget_carry=True)
    g = _group("67+48", "115", [good, sloppy], tokenizer)
    g = _score_group(g, [(ARITH_STEPS, 1.0, "process"), ("format", 0.0, "outcome")])
    assert g.step_rewards == [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]
    assert g.rewards == [1.0, pytest.approx(1 / 3)]
    batch = collate_groups([g], pad_id=0)
    assert batch.step_rewards == g.step_rewards
    assert batch.step_ends == [s.step_ends for s in g.samples]
    adv = _process_adv(batch.step_rewards, batch.step_ends, batch.response_mask)
    # R = {1,1,1,1,0,0}: mean 2/3, unbiased std sqrt(4/15); +1 steps -> +z1, 0 steps -> -z0
    sd = math.sqrt(4 / 15)
    z1, z0 = (1 - 2 / 3) / (sd + 1e-6), (0 - 2 / 3) / (sd + 1e-6)
    e0, e1 = batch.step_ends
    assert adv[0, 0].item() == pytest.approx(3 * z1, rel=1e-5)  # three good steps ahead of the first token
    assert adv[0, e0[-1]].item() == pytest.approx(z1, rel=1e-5)
    assert adv[1, 0].item() == pytest.approx(z1 + 2 * z0, rel=1e-5)
    assert adv[1, e1[0] + 1].item() == pytest.approx(2 * z0, rel=1e-5)  # after the correct first column
    assert adv[1, e1[-1]].item() == pytest.approx(z0, rel=1e-5)
    n0 = len(g.samples[0].response_ids)
    assert (adv[0, n0:] == 0).all()  # padding gets nothing


def test_collate_rejects_mismatched_steps(tokenizer):
    g = _group("67+48", "115", [arith.worked_solution({"question": "67+48"})] * 2, tokenizer)
    g.rewards = [1.0, 1.0]
    g.step_rewards = [[1.0, 1.0, 1.0], [1.0]]  # sample 1: 1 reward for 3 step ends
    with pytest.raises(ValueError, match="sample 1 has 1 step rewards but 3 step ends"):
        collate_groups([g], pad_id=0)
    g.step_rewards = [[1.0, 1.0, 1.0], None]  # excluded sample: no steps
    batch = collate_groups([g], pad_id=0)
    assert batch.step_rewards[1] == [] and batch.step_ends[1] == []
    # shards keep the ragged fields aligned with their rows
    assert batch.select(slice(1, 2)).step_ends == [[]]
    assert batch.select(torch.tensor([1, 0])).step_rewards == [[], [1.0, 1.0, 1.0]]


def test_add_to_last_step_and_informative():
    out = grpo.add_to_last_step([[1.0, 0.0], [], [2.0]], torch.tensor([-0.5, 3.0, 1.0]))
    assert out == [[1.0, -0.5], [], [3.0]]
    with pytest.raises(ValueError):
        grpo.add_to_last_step([[1.0]], torch.tensor([1.0, 2.0]))
    # a group is informative when its samples' step rewards are not all equal (group_signal flattens them)
    def group(step_rewards):
        return Group(Prompt(0, "q", [1], "q", "1"), [], step_rewards=step_rewards)

    assert grpo.informative(group_signal(group([[1.0, 0.0], [1.0]]), True))
    assert not grpo.informative(group_signal(group([[1.0, 1.0], [1.0], None, []]), True))
    assert not grpo.informative(group_signal(group([[1.0, NAN], [NAN]]), True))  # one valid reward only


# ---------------------------------------------------------------- config


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text("model: {path: builtin:qwen2-tiny}\ndata: {source: 'troupe.demo.arith:ArithTask'}\n" + text)
    return p


def test_config_process_needs_a_process_function(tmp_path):
    with pytest.raises(ConfigError, match="needs a reward function with kind: process"):
        load_config(_write(tmp_path, "algo: {advantage: process}\n"))
    with pytest.raises(ConfigError, match="algo.advantage is 'grpo'"):
        load_config(_write(tmp_path, "reward: {functions: [{name: 'troupe.demo.arith:arith_steps', kind: process}]}\n"))
    with pytest.raises(ConfigError, match="kind"):
        load_config(_write(tmp_path, "reward: {functions: [{name: 'troupe.demo.arith:arith_steps', kind: steps}]}\n"))
    cfg = load_config(_write(tmp_path, "algo: {advantage: process}\nreward: {step_delimiter: ',', functions: "
                                       "[{name: 'troupe.demo.arith:arith_steps', kind: process}, {name: format, weight: 0.1}]}\n"))
    assert cfg.reward.functions[0].kind == "process" and cfg.reward.functions[1].kind == "outcome"
    assert cfg.reward.step_delimiter == ","


def test_process_preset_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "arith_process_cpu.yaml")
    assert cfg.algo.advantage.name == "process" and cfg.reward.step_delimiter == ","


def test_score_cli_process_config(tmp_path, capsys):
    """`troupe score --config` with a process function writes each row's step rewards."""
    import json

    from troupe.cluster.score_cli import main

    good = arith.worked_solution({"question": "67+48"})
    sloppy = arith.worked_solution({"question": "67+48"}, forget_carry=True)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": "67+48", "completion": c, "reference": "115"}) + "\n" for c in (good, sloppy)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("reward:\n  step_delimiter: ','\n  functions:\n    - {name: 'troupe.demo.arith:arith_steps', kind: process}\n"
                   "    - {name: format, weight: 0.5}\n")
    assert main([str(inp), "--config", str(cfg), "--out", str(tmp_path / "o.jsonl")]) == 0
    recs = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["step_rewards"] for r in recs] == [[1.0, 1.0, 1.5], [1.0, 0.0, 0.5]]
    assert [r["reward"] for r in recs] == [1.5, pytest.approx(1 / 3 + 0.5)]


def test_loop_advantages_put_sequence_terms_on_the_last_step(tmp_path, tokenizer):
    """learner.step.step_advantages under algo.advantage 'process': the DAPO overlong penalty of each
    sample lands on its last step before the group normalisation (no Ray actor is started)."""

    good = arith.worked_solution({"question": "67+48"})
    sloppy = arith.worked_solution({"question": "67+48"}, forget_carry=True)
    g = _group("67+48", "115", [good, sloppy], tokenizer)
    g = _score_group(g, [(ARITH_STEPS, 1.0, "process")])
    batch = collate_groups([g], pad_id=0)
    lengths = [len(s.response_ids) for s in g.samples]
    L = max(lengths)
    cfg = load_config(_write(tmp_path, f"rollout: {{group_size: 2, prompts_per_step: 1, max_new_tokens: {L}}}\n"
                                       "learner: {micro_batch_size: 2}\n"
                                       "algo: {advantage: process, overlong_buffer: 4, overlong_penalty: 1.0}\n"
                                       "reward: {step_delimiter: ',', functions: [{name: 'troupe.demo.arith:arith_steps', kind: process}]}\n"))
    adv, _ = step_advantages(batch, cfg.algo, 2, L)
    rewards = batch.rewards + sequence_shaping(batch, cfg.algo, L, None)
    # DAPO ramp: L_i > L - 4 gets (L - 4 - L_i) / 4
    pen = [min(0.0, (L - 4 - n) / 4) for n in lengths]
    assert pen[lengths.index(L)] == -1.0
    expected = _process_adv([[1.0, 1.0, 1.0 + pen[0]], [1.0, 0.0, 0.0 + pen[1]]], batch.step_ends, batch.response_mask)
    assert torch.allclose(adv, expected)
    assert rewards.tolist() == pytest.approx([1.0 + pen[0], 1 / 3 + pen[1]])
    # the same batch under outcome GRPO: one advantage per sample, broadcast over its tokens
    adv_o, _ = step_advantages(batch, cfg.algo.model_copy(update={"advantage": GRPOAdvantage()}), 2, L)
    assert adv_o[0, 0] > 0 > adv_o[1, 0] and (adv_o[0, :lengths[0]] == adv_o[0, 0]).all()


def test_loop_advantages_put_kl_in_reward_on_the_last_step(tmp_path, tokenizer):
    """kl_in 'reward' under process supervision: -kl_coef * sum_t KL_t of each sample is added to
    its last step (k1 with hand-picked log-probs, so the KL sums are exact)."""

    good = arith.worked_solution({"question": "67+48"})
    sloppy = arith.worked_solution({"question": "67+48"}, forget_carry=True)
    g = _group("67+48", "115", [good, sloppy], tokenizer)
    g = _score_group(g, [(ARITH_STEPS, 1.0, "process")])
    batch = collate_groups([g], pad_id=0)
    cfg = load_config(_write(tmp_path, "rollout: {group_size: 2, prompts_per_step: 1, max_new_tokens: 64}\n"
                                       "learner: {micro_batch_size: 2}\n"
                                       "algo: {advantage: process, kl_coef: 0.5, kl_in: reward, kl_estimator: k1}\n"
                                       "reward: {step_delimiter: ',', functions: [{name: 'troupe.demo.arith:arith_steps', kind: process}]}\n"))
    old = torch.full((2, batch.response_len), -1.0)
    ref = torch.full((2, batch.response_len), -1.25)  # k1 = old - ref = 0.25 per token
    kl_sums = grpo.sequence_kl(old, ref, batch.response_mask, "k1")
    adv, _ = step_advantages(batch, cfg.algo, 2, 64, kl_sums)
    rewards = batch.rewards + sequence_shaping(batch, cfg.algo, 64, kl_sums)
    kl = [0.5 * 0.25 * len(s.response_ids) for s in g.samples]  # kl_coef * sum over the sample's tokens
    expected = _process_adv([[1.0, 1.0, 1.0 - kl[0]], [1.0, 0.0, 0.0 - kl[1]]], batch.step_ends, batch.response_mask)
    assert torch.allclose(adv, expected)
    assert rewards.tolist() == pytest.approx([1.0 - kl[0], 1 / 3 - kl[1]])
