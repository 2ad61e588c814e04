"""Rejection sampling without Ray: the filters on hand-made samples (troupe.reward.rejection), their order
and counts, the per-prompt cap, the general-data mix and SFT-file reader (troupe.rollout.rejection), the
``rejection`` config section, and the stage's checks before Ray starts (troupe.cluster.rejection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from troupe.configs.schema import ConfigError, RejectionSamplingConfig, dump_config, load_config
from troupe.core.types import Group, Prompt, Sample
from troupe.reward.rejection import (
    FILTERS,
    SampleRecord,
    apply_filters,
    group_records,
    normalize_text,
    passes_correct,
    passes_format,
    passes_language,
    passes_length,
    select,
)
from troupe.reward.verifiers import accuracy_reward, format_reward
from troupe.rollout.data import DataError
from troupe.rollout.rejection import mix_general, read_sft_file

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Compute 7+8 step by step"  # Latin words: the language filter's target script
RIGHT = "<think>7+8=15</think><answer>15</answer>"
WRONG = "<think>7+8=16</think><answer>16</answer>"
NO_FORMAT = "the answer is 15"
MIXED = "<think>7+8=15 因此 15</think><answer>15</answer>"  # the CoT switches to Chinese
CONSISTENT = "<think>seven plus eight is 15</think><answer>15</answer>"


def rec(completion: str, *, tokens: int = 10, truncated: bool = False, question: str = QUESTION,
        answer: str = "15", **parts) -> SampleRecord:
    """A sample scored by the real verifier (accuracy part) unless parts are given."""
    parts = parts or {"accuracy": accuracy_reward(completion, answer)}
    return SampleRecord(question, answer, f"Q: {question}\n", completion, tokens, truncated, parts)


def cfg(**kw) -> RejectionSamplingConfig:
    return RejectionSamplingConfig(**kw)


def test_correct_filter_reads_the_named_part_against_the_threshold():
    c = cfg()
    assert passes_correct(rec(RIGHT), c) and not passes_correct(rec(WRONG), c)
    assert not passes_correct(rec(NO_FORMAT), c)  # accuracy reads the <answer> block only
    assert not passes_correct(rec(RIGHT, accuracy=None), c)  # unscored (failed or routed away)
    assert not passes_correct(rec(RIGHT, other=1.0), c)  # no accuracy part at all
    assert not passes_correct(rec(RIGHT, accuracy=float("nan")), c)
    graded = cfg(correct_function="gsm8k", correct_threshold=0.5)
    assert passes_correct(rec(RIGHT, gsm8k=0.5), graded) and not passes_correct(rec(RIGHT, gsm8k=0.49), graded)
    assert not passes_correct(rec(RIGHT, accuracy=1.0), graded)  # another part does not count


def test_format_filter():
    c = cfg()
    assert passes_format(rec(RIGHT), c) and passes_format(rec(WRONG), c)
    # without its opening <think> only after a prompt that ends with it (R1's template): the SFT target
    # must be whole after its prompt, though format_reward itself accepts both
    half = "7+8=15</think><answer>15</answer>"
    assert format_reward(half) == 1.0 and not passes_format(rec(half), c)
    assert passes_format(SampleRecord(QUESTION, "15", "Q: 7+8\n<think>", half, 9, False), c)
    assert not passes_format(rec(NO_FORMAT), c)
    assert not passes_format(rec("<answer>15</answer>"), c)
    assert not passes_format(rec(RIGHT + " and more"), c)


def test_language_filter_rejects_mixed_languages():
    c = cfg()
    assert passes_language(rec(CONSISTENT), c)
    assert not passes_language(rec(MIXED), c)  # 2 CJK words, 0 Latin: consistency 0
    half = "<think>seven plus eight 因 15</think><answer>15</answer>"  # 3 Latin words of 4: 0.75
    assert not passes_language(rec(half), c)
    assert passes_language(rec(half), cfg(min_language=0.75))
    assert not passes_language(rec(half), cfg(min_language=0.76))
    # a question without words ("7+8") makes the completion's own dominant script the target
    assert passes_language(rec(MIXED, question="7+8"), c)
    assert not passes_language(rec("<think>so so 因</think><answer>15</answer>", question="7+8"), c)


def test_length_filter_rejects_truncated_and_long():
    assert passes_length(rec(RIGHT, tokens=64), cfg())  # no max_tokens: only truncation counts
    assert not passes_length(rec(RIGHT, tokens=3, truncated=True), cfg())
    capped = cfg(max_tokens=12)
    assert passes_length(rec(RIGHT, tokens=12), capped) and not passes_length(rec(RIGHT, tokens=13), capped)
    assert not passes_length(rec(RIGHT, tokens=5, truncated=True), capped)


def test_dedup_keeps_the_first_of_each_normalized_text():
    assert normalize_text("  <think>a\n\n b</think>\t<answer>1</answer>\n") == "<think>a b</think> <answer>1</answer>"
    samples = [rec("<think>7+8 = 15</think> <answer>15</answer>"), rec(WRONG),
               rec("  <think>7+8  =\n15</think>\n<answer>15</answer> "),  # same text but for whitespace
               rec("<think>7+8=15</think> <answer>15</answer>"),  # differs inside a word: kept
               rec(WRONG + "\n")]
    assert FILTERS["dedup"](samples, cfg()) == [True, True, False, True, False]
    kept, removed = apply_filters(samples, cfg(filters=["dedup"]))
    assert kept == [samples[0], samples[1], samples[3]] and removed == {"dedup": 2}


def test_filters_apply_in_order_and_count_each_sample_once():
    samples = [rec(RIGHT), rec(WRONG), rec(NO_FORMAT), rec(MIXED), rec(RIGHT, truncated=True),
               rec(CONSISTENT), rec(" " + RIGHT)]
    every = ["correct", "format", "language", "length", "dedup"]
    kept, removed = apply_filters(samples, cfg(filters=every))
    # WRONG and NO_FORMAT fail correct first (NO_FORMAT also fails format: counted once), MIXED language,
    # the truncated one length, " " + RIGHT repeats RIGHT
    assert kept == [samples[0], samples[5]]
    assert removed == {"correct": 2, "format": 0, "language": 1, "length": 1, "dedup": 1}
    assert sum(removed.values()) + len(kept) == len(samples)
    # another order removes the same samples, counted under other filters: dedup first also removes the
    # truncated copy of RIGHT (same text), which length then never sees
    kept2, removed2 = apply_filters(samples, cfg(filters=["dedup", "length", "format", "language", "correct"]))
    assert kept2 == kept
    assert removed2 == {"dedup": 2, "length": 0, "format": 1, "language": 1, "correct": 1}
    # only the listed filters run
    kept3, removed3 = apply_filters(samples, cfg(filters=["format"]))
    assert kept3 == [s for s in samples if s is not samples[2]] and removed3 == {"format": 1}
    assert apply_filters(samples, cfg(filters=[])) == (samples, {})
    assert set(FILTERS) == set(every)


def test_select_keeps_the_first_k_in_sample_order():
    samples = [rec(RIGHT, tokens=i) for i in range(5)]
    assert select(samples, 2) == samples[:2]
    assert select(samples, 9) == samples
    assert select([], 2) == []
    with pytest.raises(ValueError, match="rejection.max_per_prompt"):
        select(samples, 0)


def test_group_records_from_a_scored_group():
    p = Prompt(uid=7, text="Q: 7+8\n", token_ids=[1, 2], question="7+8", answer="15")
    g = Group(p, [Sample([5, 6, 7], [0.0] * 3, RIGHT, False, 0), Sample([5] * 40, [0.0] * 40, WRONG, True, 0)],
              rewards=[1.0, None], reward_parts={"accuracy": [1.0, 0.0], "format": [1.0, None]})
    r0, r1 = group_records(g)
    assert (r0.question, r0.answer, r0.prompt, r0.completion, r0.num_tokens, r0.truncated, r0.reward) == \
        ("7+8", "15", "Q: 7+8\n", RIGHT, 3, False, 1.0)
    assert dict(r0.parts) == {"accuracy": 1.0, "format": 1.0} and dict(r1.parts) == {"accuracy": 0.0, "format": None}
    assert (r1.num_tokens, r1.truncated, r1.reward) == (40, True, None)
    unscored = group_records(Group(p, g.samples))
    assert dict(unscored[0].parts) == {} and unscored[0].reward is None


def test_mix_general_fraction_and_seed():
    general = [(f"p{i}", f"c{i}") for i in range(100)]
    rows = mix_general(30, general, 0.25, seed=3)  # 0.25 / 0.75 * 30 = 10: a quarter of 40
    assert len(rows) == 10 and len(set(rows)) == 10 and set(rows) <= set(general)
    assert rows == sorted(rows, key=general.index)  # file order
    assert mix_general(30, general, 0.25, seed=3) == rows  # reproducible
    assert mix_general(30, general, 0.25, seed=4) != rows
    assert len(mix_general(30, general, 0.5, seed=3)) == 30
    assert mix_general(30, general, 0.0, seed=3) == []
    assert mix_general(0, general, 0.5, seed=3) == []
    assert mix_general(300, general, 0.9, seed=3) == general  # capped by the file
    assert len(mix_general(5, general, 0.1, seed=3)) == 1  # 5/9 = 0.56 rounds to 1
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="rejection.general_sft.fraction"):
            mix_general(5, general, bad, seed=0)


def test_read_sft_file(tmp_path):
    f = tmp_path / "general.jsonl"
    f.write_text('{"prompt": "Write a haiku.", "completion": "Autumn moon", "extra": 1}\n\n'
                 '{"prompt": "", "completion": "no prompt"}\n')
    assert read_sft_file(f) == [("Write a haiku.", "Autumn moon"), ("", "no prompt")]
    cases = [
        ('{"prompt": "a", "completion": "b"}\n{"completion": "b"}\n', f"{f}:2", "missing field 'prompt'"),
        ('{"prompt": "a"}\n', f"{f}:1", "missing field 'completion'"),
        ('\n{"prompt": 3, "completion": "b"}\n', f"{f}:2", "field 'prompt' must be a string, got int"),
        ('{"prompt": "a", "completion": ["b"]}\n', f"{f}:1", "field 'completion' must be a string, got list"),
        ('{"prompt": "a", "completion": "  "}\n', f"{f}:1", "field 'completion' is empty"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": \n', f"{f}:2", "invalid JSON"),
        ('["a", "b"]\n', f"{f}:1", "row is a list"),
        ("\n\n", str(f), "no rows"),
    ]
    for text, where, what in cases:
        f.write_text(text)
        with pytest.raises(DataError) as e:
            read_sft_file(f)
        assert str(e.value).startswith(where + ":") and what in str(e.value), (text, str(e.value))
    with pytest.raises(DataError, match="no such SFT data file"):
        read_sft_file(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ config


def _arith(tmp_path: Path, **rejection) -> Path:
    data = yaml.safe_load((REPO / "configs" / "arith_cpu.yaml").read_text())
    if rejection:
        data["rejection"] = rejection
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_config_defaults_and_errors(tmp_path):
    c = load_config(_arith(tmp_path)).rejection
    assert (c.num_prompts, c.n, c.temperature, c.filters, c.correct_name, c.correct_threshold, c.max_per_prompt,
            c.general_sft) == (512, 8, None, ["correct", "format", "dedup"], "accuracy", 1.0, 2, None)
    bad = [
        (dict(filters=["correct", "shiny"]), "rejection.filters.1"),
        (dict(filters=["format", "format"]), "listed twice"),
        (dict(correct_function="gsm8k"), "rejection.correct_function 'gsm8k' is not a reward.functions name"),
        (dict(n=0), "rejection.n"),
        (dict(min_language=1.5), "rejection.min_language"),
        (dict(max_tokens=0), "rejection.max_tokens"),
        (dict(general_sft={"path": "g.jsonl", "fraction": 1.0}), "rejection.general_sft.fraction"),
        (dict(general_sft={"path": "missing.jsonl"}), "rejection.general_sft.path: file not found"),
        (dict(colour="red"), "rejection.colour: unknown key"),
    ]
    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    for section, needle in bad:
        with pytest.raises(ConfigError) as e:
            load_config(_arith(tmp_path, **section))
        assert needle in str(e.value), (section, str(e.value))
    # correct_function is only checked when the correct filter is on
    assert load_config(_arith(tmp_path, correct_function="gsm8k", filters=["format"])).rejection.filters == ["format"]
    # a relative general file resolves against the config's folder
    c = load_config(_arith(tmp_path, general_sft={"path": "g.jsonl", "fraction": 0.2})).rejection
    assert c.general_sft.path == str(tmp_path / "g.jsonl") and c.general_sft.fraction == 0.2


def test_default_correct_function_is_checked_by_the_stage_not_by_every_config(tmp_path):
    # gsm8k's reward has no 'accuracy': the config stays valid (and round-trips), the stage refuses it
    cfg_ = load_config(REPO / "configs" / "gsm8k_cpu.yaml")
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg_))
    assert load_config(p) == cfg_
    with pytest.raises(ValueError, match="rejection.correct_function 'accuracy'"):
        cfg_.rejection.check_reward(cfg_.reward, default_too=True)
    from troupe.cluster.rejection import run_rejection_sampling

    with pytest.raises(ConfigError, match="rejection.correct_function"):
        run_rejection_sampling(cfg_, str(tmp_path), tmp_path / "out", log=lambda s: None)
    ok = load_config(REPO / "configs" / "gsm8k_cpu.yaml", ["rejection.correct_function=gsm8k"])
    ok.rejection.check_reward(ok.reward, default_too=True)


def test_stage_checks_before_ray(tmp_path):
    from troupe.cluster.rejection import run_rejection_sampling

    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    c = load_config(_arith(tmp_path, general_sft={"path": "g.jsonl"}))
    with pytest.raises(ConfigError, match="does not exist"):
        run_rejection_sampling(c, str(tmp_path / "no_model"), tmp_path / "out", log=lambda s: None)
    with pytest.raises(DataError, match=f"{tmp_path / 'g.jsonl'}:2: missing field 'completion'"):
        run_rejection_sampling(c, str(tmp_path), tmp_path / "out", log=lambda s: None)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ writing the set


def _group(uid: int, question: str, answer: str, texts: list[str], truncated: tuple[int, ...] = ()) -> Group:
    """A group scored as the arithmetic preset scores it: accuracy (weight 1) and format (weight 0)."""
    p = Prompt(uid=uid, text=f"Compute {question}.\n", token_ids=[1, 2, 3], question=question, answer=answer)
    samples = [Sample(list(range(len(t))), [0.0] * len(t), t, i in truncated, 0) for i, t in enumerate(texts)]
    acc = [accuracy_reward(t, answer) for t in texts]
    return Group(p, samples, rewards=list(acc), reward_parts={"accuracy": acc, "format": [format_reward(t) for t in texts]})


def test_write_rejection_set_files_and_counts(tmp_path):
    from troupe.cluster.rejection import write_rejection_set
    from troupe.rollout.preferences import load_pairs

    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n"
                                              for i in range(10)))
    c = load_config(_arith(tmp_path, n=4, max_per_prompt=2, filters=["correct", "format", "length", "dedup"],
                           general_sft={"path": "g.jsonl", "fraction": 0.5}))
    groups = [
        _group(0, "7+8", "15", [WRONG, RIGHT, " " + RIGHT + "\n", CONSISTENT]),  # WRONG out, the copy out: 2 kept
        _group(1, "2+2", "4", ["<think>2+2=5</think><answer>5</answer>"] * 4),  # all wrong: none, no pair (tie)
        _group(2, "1+1", "2", ["<think>1+1=2</think><answer>2</answer>", "<think>1+1=2</think> so <answer>2</answer>",
                               "<think>so 2</think><answer>2</answer>", "<think>1+1=3</think><answer>3</answer>"],
               truncated=(0,)),  # right but truncated; right but text between the blocks; right; wrong
    ]
    lines: list[str] = []
    stats = write_rejection_set(c, [([0, 1], groups[:2]), ([2], groups[2:])], 3,
                                read_sft_file(tmp_path / "g.jsonl"), tmp_path / "out", log=lines.append)
    assert stats["removed"] == {"correct": 1 + 4 + 1, "format": 1, "length": 1, "dedup": 1}
    assert (stats["samples"], stats["kept"], stats["over_max_per_prompt"], stats["prompts_with_kept"]) == (12, 3, 0, 2)
    assert stats["samples"] == sum(stats["removed"].values()) + stats["over_max_per_prompt"] + stats["kept"]
    assert stats["general"] == 3 and stats["rows"] == 6  # 0.5 / 0.5 * 3 kept
    assert stats["accuracy_mean"] == pytest.approx(6 / 12) and stats["num_pairs"] == 2
    rows = [json.loads(x) for x in (tmp_path / "out" / "sft_data.jsonl").read_text().splitlines()]
    assert [(r["source"], r["completion"]) for r in rows[:3]] == [
        ("rejection", RIGHT), ("rejection", CONSISTENT), ("rejection", "<think>so 2</think><answer>2</answer>")]
    assert rows[0]["prompt"] == "Compute 7+8.\n" and (rows[0]["question"], rows[0]["answer"]) == ("7+8", "15")
    assert [r["source"] for r in rows[3:]] == ["general"] * 3 and all(r["answer"] is None for r in rows[3:])
    assert read_sft_file(tmp_path / "out" / "sft_data.jsonl") == [(r["prompt"], r["completion"]) for r in rows]
    # pairs from all samples of a group, filtered or not: a best (reward 1) against a worst (0); none for the tie
    pairs = load_pairs(tmp_path / "out" / "pairs.jsonl")
    assert [p.prompt for p in pairs] == ["Compute 7+8.\n", "Compute 1+1.\n"]
    assert pairs[0].chosen in (RIGHT, " " + RIGHT + "\n", CONSISTENT)
    assert pairs[0].rejected == WRONG and pairs[1].rejected == "<think>1+1=3</think><answer>3</answer>"
    assert accuracy_reward(pairs[1].chosen, "2") == 1.0
    assert len(lines) == 2 and lines[-1].startswith("rejection sampling: 3/3 prompts")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pairs.jsonl", "sft_data.jsonl"]


def test_write_rejection_set_refuses_an_empty_set(tmp_path):
    from troupe.cluster.rejection import write_rejection_set

    c = load_config(_arith(tmp_path, correct_threshold=2.0))
    with pytest.raises(DataError) as e:
        write_rejection_set(c, [([0], [_group(0, "7+8", "15", [RIGHT, WRONG])])], 1, [], tmp_path / "out",
                            log=lambda s: None)
    msg = str(e.value)
    assert "none of the 2 samples" in msg and "rejection.filters ['correct', 'format', 'dedup']" in msg
    assert "'correct': 2" in msg and "rejection.correct_threshold" in msg
    assert list((tmp_path / "out").iterdir()) == []  # nothing written, no temporary file left
