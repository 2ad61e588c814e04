"""Iterative RL (``reward.iterative``, troupe/cluster/iterative.py) without Ray: the config section's checks,
fresh pairs from hand-made scored groups, the replay share and its seeding, and the driver object's
pending pairs and state before any round (rounds themselves: tests/test_iterative_slow.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from troupe.cluster.iterative import IterativeRewardModel, fresh_pairs, replay_count, replay_indices
from troupe.configs.schema import IterativeRMConfig, RewardConfig, load_config
from troupe.core.types import Group, Prompt, Sample

REPO = Path(__file__).resolve().parents[1]
EOS = "<eos>"


def _reward(**iterative) -> dict:
    return {"functions": [{"name": "accuracy", "weight": 0.0}, {"name": "format", "weight": 0.0}],
            "models": [{"path": "rm_a", "name": "a"}], "iterative": {"every": 2, **iterative}}


@pytest.mark.parametrize("change, needle", [
    ({"model": "b"}, r"reward\.iterative\.model: 'b' is not a reward\.models name \['a'\]"),
    ({"label": "gsm8k"}, r"reward\.iterative\.label: 'gsm8k' is not a reward\.functions name \['accuracy', 'format'\]"),
    ({"replay": 1.0}, r"iterative\.replay\n.*less than 1"),
    ({"replay": -0.1}, r"iterative\.replay\n.*greater than or equal to 0"),
    ({"every": 0}, r"iterative\.every\n.*greater than or equal to 1"),
    ({"pairs_per_round": 0}, r"iterative\.pairs_per_round"),
    ({"unknown_key": 1}, r"iterative\.unknown_key\n.*Extra inputs"),
])
def test_bad_iterative_sections_name_the_key(change, needle):
    with pytest.raises(ValueError, match=needle):
        RewardConfig.model_validate(_reward(**change))


def test_model_must_be_named_when_ambiguous_and_must_exist():
    raw = _reward()
    raw["models"].append({"path": "rm_b", "name": "b"})
    with pytest.raises(ValueError, match=r"reward\.iterative\.model: reward\.models has 2 models \['a', 'b'\]"):
        RewardConfig.model_validate(raw)
    raw["iterative"]["model"] = "b"
    assert RewardConfig.model_validate(raw).iterative_model.path == "rm_b"
    with pytest.raises(ValueError, match=r"reward\.iterative retrains a reward model: reward\.models is empty"):
        RewardConfig.model_validate({**_reward(), "models": []})
    with pytest.raises(ValueError, match=r"every\n.*Field required"):
        RewardConfig.model_validate({**_reward(), "iterative": {}})


def test_defaults_and_the_only_model():
    cfg = RewardConfig.model_validate(_reward())
    assert cfg.iterative_model.name == "a" and cfg.iterative.label == "accuracy"
    it = cfg.iterative
    assert (it.replay, it.epochs, it.pairs_per_prompt, it.max_length, it.data, it.num_cpus) == (0.1, 1, 1, None, None, 0.0)
    assert RewardConfig().iterative is None and RewardConfig().iterative_model is None


def test_preset_data_path_resolves_and_null_override_turns_it_off(tmp_path):
    """The preset's data path is relative to the config file; `reward.iterative=null` is arith_rm_cpu.yaml."""
    cfg = load_config(REPO / "configs" / "iterative_rl_arith_cpu.yaml")
    assert cfg.reward.iterative.data == str((REPO / "runs" / "rm_arith_pairs.jsonl").resolve())
    assert cfg.reward.iterative.every == 5 and cfg.reward.iterative_model.name == "rm"
    static = load_config(REPO / "configs" / "iterative_rl_arith_cpu.yaml", ["reward.iterative=null", "name=arith_rm"])
    assert static.reward.iterative is None
    assert static.model_dump() == load_config(REPO / "configs" / "arith_rm_cpu.yaml").model_dump()


def test_missing_data_file_is_named_by_check(tmp_path, capsys):
    from troupe.cluster.cli import main

    raw = yaml.safe_load((REPO / "configs" / "arith_cpu.yaml").read_text())
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "config.json").write_text("{}")
    raw["reward"] = {"functions": [{"name": "accuracy", "weight": 0.0}],
                     "models": [{"path": str(tmp_path / "rm"), "num_cpus": 0}],
                     "iterative": {"every": 1, "data": "pairs.jsonl"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "run.yaml")  # a file an earlier command writes: resolved, not required yet
    assert cfg.reward.iterative.data == str(tmp_path / "pairs.jsonl")
    assert main(["check", str(tmp_path / "run.yaml")]) == 2
    assert f"reward.iterative.data: file not found: {tmp_path / 'pairs.jsonl'}" in capsys.readouterr().err
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert main(["check", str(tmp_path / "run.yaml")]) == 0


def _group(uid: int, texts: list[str], labels: list, part: str = "accuracy") -> Group:
    prompt = Prompt(uid=uid, text=f"Q{uid}: ", token_ids=[], question=f"q{uid}", answer="")
    g = Group(prompt, [Sample([], [], t, False, 0) for t in texts])
    g.reward_parts = {part: list(labels), "rm": [0.0] * len(texts)}
    return g


def test_fresh_pairs_take_highest_label_against_lowest():
    groups = [
        _group(0, ["right", "wrong", "also wrong"], [1.0, 0.0, 0.0]),
        _group(1, ["a", "b", "c"], [1.0, 1.0, 1.0]),                 # all equal: no pair
        _group(2, ["x", "y", "z"], [None, 0.0, 1.0]),                # an unscored sample takes no part
        _group(3, ["m", "n"], [1.0, 0.0], part="format"),            # no label part: no pair
        _group(4, ["best", "mid", "worst"], [0.9, 0.5, 0.1]),        # graded labels: extremes only
    ]
    pairs = fresh_pairs(groups, "accuracy", EOS, per_group=1, seed=0, step=3)
    assert len(pairs) == 3 and all(m is None for _, _, m in pairs)
    assert pairs[0][0] == "Q0: right<eos>" and pairs[0][1] in ("Q0: wrong<eos>", "Q0: also wrong<eos>")
    assert pairs[1][:2] == ("Q2: z<eos>", "Q2: y<eos>")
    assert pairs[2][:2] == ("Q4: best<eos>", "Q4: worst<eos>")


def test_fresh_pairs_per_group_cap_and_seeding():
    g = _group(0, ["r1", "r2", "w1", "w2"], [1.0, 1.0, 0.0, 0.0])  # 4 distinct (chosen, rejected) combinations
    two = fresh_pairs([g], "accuracy", EOS, per_group=2, seed=0, step=1)
    assert len(two) == 2 and len(set(two)) == 2
    assert len(fresh_pairs([g], "accuracy", EOS, per_group=10, seed=0, step=1)) == 4
    assert fresh_pairs([g], "accuracy", EOS, per_group=2, seed=0, step=1) == two  # same (seed, step, group): same
    draws = {tuple(fresh_pairs([g], "accuracy", EOS, per_group=1, seed=0, step=s)) for s in range(1, 30)}
    assert len(draws) > 1  # the step is part of the seed


def test_replay_share_and_seeded_draw():
    assert replay_count(180, 0.1, 10_000) == 20          # 20 / (180 + 20) = 0.1
    assert replay_count(9, 0.1, 10_000) == 1             # 1.0 (rounding error 0.9999...) rounds to 1
    assert replay_count(180, 0.5, 10_000) == 180
    assert replay_count(180, 0.1, 7) == 7                # no more than the pool holds
    assert replay_count(180, 0.0, 10_000) == 0
    with pytest.raises(ValueError, match=r"replay share must be in \[0, 1\)"):
        replay_count(10, 1.0, 10)
    a = replay_indices(1000, 50, seed=0, version=3)
    assert a == replay_indices(1000, 50, seed=0, version=3) and a == sorted(set(a)) and len(a) == 50
    assert all(0 <= i < 1000 for i in a)
    assert a != replay_indices(1000, 50, seed=0, version=4) and a != replay_indices(1000, 50, seed=1, version=3)
    assert replay_indices(5, 5, seed=0, version=1) == [0, 1, 2, 3, 4]


def test_driver_object_collects_pending_pairs_before_a_round(rm_dir, tmp_path):
    """Without Ray: the pool is the data file's pairs as the RM scores them; steps add pending pairs; the
    state a checkpoint keeps is JSON."""
    from transformers import AutoTokenizer

    from troupe.configs.schema import RunConfig

    eos = AutoTokenizer.from_pretrained(rm_dir).eos_token
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"P{i} ", "chosen": "good", "rejected": "bad"}) + "\n"
                                                  for i in range(3)))
    raw = yaml.safe_load((REPO / "configs" / "arith_cpu.yaml").read_text())
    raw["reward"] = {"functions": [{"name": "format", "weight": 0.0}, {"name": "accuracy", "weight": 0.0}],
                     "models": [{"path": rm_dir, "name": "judge"}],
                     "iterative": {"every": 3, "label": "accuracy", "data": str(tmp_path / "pairs.jsonl")}}
    cfg = RunConfig.model_validate(raw)
    it = IterativeRewardModel(cfg, tmp_path / "run", log=lambda s: None)
    assert it.name == "judge" and it.label == "accuracy" and it.version == 0 and it.folder == str(Path(rm_dir).resolve())
    assert it.pool == [(f"P{i} good{eos}", f"P{i} bad{eos}", None) for i in range(3)] and it.reference == it.pool
    assert it.root == (tmp_path / "run" / "reward_models" / "judge").resolve()
    assert [it.due(s) for s in range(1, 7)] == [False, False, True, False, False, True]
    assert it.observe(1, [_group(0, ["r", "w"], [1.0, 0.0])]) == 1
    assert it.observe(2, [_group(1, ["r", "w"], [1.0, 1.0])]) == 0
    assert it.pending == [(f"Q0: r{eos}", f"Q0: w{eos}", None)]
    state = json.loads(json.dumps(it.state_dict()))
    assert state == {"version": 0, "folder": it.folder, "pending": [[f"Q0: r{eos}", f"Q0: w{eos}"]]}
    tc = it.trainer_config()  # the trainer's config: one rank, batch_size as micro-batch, the model's max_length
    assert tc.learner.num_ranks == 1 and tc.learner.micro_batch_size == tc.train.batch_size == 32
    assert tc.train.max_length == 1024 and tc.model.path == it.folder and tc.device == "cpu"
    assert IterativeRMConfig(every=1, max_length=64).max_length == 64
