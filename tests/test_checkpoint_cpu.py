"""Checkpoint bookkeeping without the stack: which folders count, what a resume may change, the
prompt stream's saved position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from troupe.cluster import checkpoint
from troupe.configs.schema import ConfigError, dump_config, load_config
from troupe.rollout.prompts import PromptStream, sampling_seeds

REPO = Path(__file__).resolve().parents[1]


def _fake_checkpoint(root: Path, name: str, complete: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if complete:
        (d / checkpoint.STATE_FILE).write_text(json.dumps({"format": checkpoint.FORMAT, "step": 1}))
    return d


def test_only_complete_step_folders_count(tmp_path):
    _fake_checkpoint(tmp_path, "step_2")
    _fake_checkpoint(tmp_path, "step_10")
    _fake_checkpoint(tmp_path, ".tmp-step_12")            # killed while writing: renamed never
    _fake_checkpoint(tmp_path, "step_11", complete=False)  # no trainer_state.json
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_2", "step_10"]  # numeric order
    assert checkpoint.latest(tmp_path).name == "step_10"
    assert checkpoint.latest(tmp_path / "none") is None
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.load_state(tmp_path / "step_11")


def test_resume_refuses_fixed_keys_and_lists_the_allowed_changes(tmp_path):
    cfg = load_config(REPO / "configs" / "arith_cpu.yaml")
    d = _fake_checkpoint(tmp_path, "step_4")
    (d / "config.yaml").write_text(dump_config(cfg))
    later = load_config(REPO / "configs" / "arith_cpu.yaml", ["steps=80", "eval_every=5"])
    assert checkpoint.check_compatible(d, later) == ["eval_every", "steps"]
    bad = load_config(REPO / "configs" / "arith_cpu.yaml", ["rollout.group_size=4", "learner.num_ranks=2"])
    with pytest.raises(ConfigError) as e:
        checkpoint.check_compatible(d, bad)
    assert "rollout.group_size: 8 -> 4" in str(e.value) and "learner.num_ranks: 1 -> 2" in str(e.value)


def test_prompt_stream_resumes_where_it_stopped_across_epochs():
    whole = PromptStream(list(range(5)), seed=3)
    first = [next(whole) for _ in range(7)]  # into the second epoch
    state = json.loads(json.dumps(whole.state_dict()))
    rest = [next(whole) for _ in range(9)]
    resumed = PromptStream(list(range(5)), seed=3)
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(9)] == rest and resumed.position == 16
    assert sorted(first[:5]) == list(range(5))  # an epoch is a permutation
    with pytest.raises(ValueError, match="taken over 5 prompts, this run has 4"):
        PromptStream(list(range(4)), seed=3).load_state_dict(state)


def test_sampling_seeds_depend_only_on_seed_step_and_position():
    assert sampling_seeds(0, 3, [5, 6]) == sampling_seeds(0, 3, [5, 6])
    assert len({*sampling_seeds(0, 3, [5, 6]), *sampling_seeds(0, 4, [5, 6]), *sampling_seeds(1, 3, [5, 6])}) == 6
    assert all(0 <= s < 2**31 - 2**16 for s in sampling_seeds(7, 1, list(range(100))))
