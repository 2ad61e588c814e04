"""Pipeline configs (troupe.configs.pipeline) and the runner's bookkeeping, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from troupe.cluster.cli import main
from troupe.configs.pipeline import is_pipeline, load_pipeline
from troupe.configs.schema import ConfigError, RewardModelTrainConfig, RunConfig

REPO = Path(__file__).resolve().parents[1]
R1 = REPO / "configs" / "r1_arith_cpu.yaml"

BASE = {
    "name": "pipe",
    "seed": 3,
    "model": {"path": "builtin:qwen2-tiny", "hidden_size": 64, "num_heads": 2, "intermediate_size": 128},
    "data": {"source": "troupe.demo.arith:ArithTask", "template": "raw", "num_eval": 8,
             "options": {"num_train": 64, "max_operand": 20}},
    "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 16},
    "learner": {"micro_batch_size": 4, "lr": 0.001},
}


def _write(tmp_path: Path, stages: list, **base) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out"), **base, "stages": stages}))
    return path


def test_stages_merge_the_base_and_chain_the_policy(tmp_path):
    path = _write(tmp_path, [
        {"kind": "sft", "name": "cold", "sft": {"steps": 7}},
        {"kind": "grpo", "name": "rl", "steps": 3, "rollout": {"temperature": 0.7}},
        {"kind": "rm_train", "name": "rm", "data": {"path": "${cold}/pairs.jsonl"}, "train": {"epochs": 2}},
        {"kind": "grpo", "name": "final", "reward": {"models": [{"path": "${rm}/model", "name": "rm"}]}},
    ])
    pipe = load_pipeline(path)
    cold, rl, rm, final = pipe.stages
    assert [s.kind for s in pipe.stages] == ["sft", "grpo", "rm_train", "grpo"]
    assert isinstance(cold.config, RunConfig) and isinstance(rm.config, RewardModelTrainConfig)
    # the base reaches every policy stage; a stage's mapping merges key by key
    assert cold.config.sft.steps == 7 and rl.config.sft.steps == 200
    assert rl.config.rollout.temperature == 0.7 and rl.config.rollout.group_size == 4
    assert final.config.rollout.temperature == 1.0 and final.config.seed == 3
    # rm_train takes only seed/device/cluster from the base
    assert rm.config.seed == 3 and rm.config.train.epochs == 2
    # names and folders
    folder = (tmp_path / "out" / "pipe").resolve()
    assert pipe.folder == tmp_path / "out" / "pipe"
    assert rl.config.name == "rl" and Path(rl.config.output_dir) == tmp_path / "out" / "pipe"
    assert rm.config.data.path == str(folder / "cold" / "pairs.jsonl")
    assert final.config.reward.models[0].path == str(folder / "rm" / "model")
    # the first policy stage starts from the base model; the others from the previous policy
    assert not cold.model_from_previous and cold.config.model.path == "builtin:qwen2-tiny"
    assert rl.model_from_previous and rm.model_from_previous and final.model_from_previous
    assert rl.label == "stages[1] 'rl' (grpo)"


def test_an_explicit_model_path_is_kept(tmp_path):
    pipe = load_pipeline(_write(tmp_path, [{"kind": "sft", "name": "a"},
                                           {"kind": "grpo", "name": "b", "model": {"path": "some/dir"}}]))
    assert not pipe.stages[1].model_from_previous and pipe.stages[1].config.model.path == "some/dir"


@pytest.mark.parametrize("stages, message", [
    ([], "stages: expected a non-empty list"),
    ([{"kind": "ppo", "name": "a"}], "stages[0].kind: expected one of sft, grpo, rejection_sampling, rm_train, got 'ppo'"),
    ([{"kind": "sft", "name": "a"}, {"kind": "grpo", "name": "a"}], "stages[1].name: 'a' is used twice"),
    ([{"kind": "sft", "name": "a b"}], "stages[0].name: expected a folder name"),
    ([{"kind": "sft", "name": "a", "data": {"path": "${b}/x.jsonl", "source": "jsonl"}}, {"kind": "grpo", "name": "b"}],
     "${b} refers to a later stage"),
    ([{"kind": "sft", "name": "a"}, {"kind": "grpo", "name": "b", "sft": {"path": "${zz}/x"}}], "${zz} names no stage"),
    ([{"kind": "sft", "name": "a"}, {"kind": "grpo", "name": "b", "steps": -2}],
     "stages[1] 'b' (grpo): invalid run config (1 error(s)):\n  steps: Input should be greater than or equal to 0"),
    ([{"kind": "sft", "name": "a"}, {"kind": "grpo", "name": "b", "algo": {"bogus": 1}}], "algo.bogus: unknown key"),
    ([{"kind": "rm_train", "name": "r"}], "stages[0] 'r' (rm_train)"),
])
def test_bad_pipelines_name_the_stage_and_key(tmp_path, stages, message):
    with pytest.raises(ConfigError) as e:
        load_pipeline(_write(tmp_path, stages))
    assert message in str(e.value)


def test_overrides_address_the_base_and_stages_by_name(tmp_path):
    path = _write(tmp_path, [{"kind": "sft", "name": "cold"}, {"kind": "grpo", "name": "rl", "steps": 3}])
    pipe = load_pipeline(path, ["seed=9", "stages.rl.steps=5", "stages.rl.algo.kl_coef=0.1", "name=other"])
    assert [s.config.seed for s in pipe.stages] == [9, 9]
    assert pipe.stages[1].config.steps == 5 and pipe.stages[1].config.algo.kl_coef == 0.1
    assert pipe.name == "other" and pipe.stages[0].config.output_dir.endswith("other")
    with pytest.raises(ConfigError, match="no stage called 'nope'"):
        load_pipeline(path, ["stages.nope.steps=1"])
    with pytest.raises(ConfigError, match="expected stages.<stage name>.key=value"):
        load_pipeline(path, ["stages.rl=3"])


def test_data_files_resolve_against_the_pipeline_file(tmp_path):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    pipe = load_pipeline(_write(tmp_path, [{"kind": "sft", "name": "a", "sft": {"path": "sft.jsonl"}}]))
    assert pipe.stages[0].config.sft.path == str((tmp_path / "sft.jsonl").resolve())
    with pytest.raises(ConfigError, match=r"stages\[0\] 'a' \(sft\): sft.path: file not found"):
        load_pipeline(_write(tmp_path, [{"kind": "sft", "name": "a", "sft": {"path": "missing.jsonl"}}]))


def test_is_pipeline(tmp_path):
    assert is_pipeline(R1)
    assert not is_pipeline(REPO / "configs" / "arith_cpu.yaml")
    assert not is_pipeline(tmp_path / "missing.yaml")


def test_r1_preset_is_the_four_r1_stages_and_checks(capsys):
    pipe = load_pipeline(R1)
    assert [s.kind for s in pipe.stages] == ["sft", "grpo", "rejection_sampling", "rm_train", "grpo"]
    names = {f.name for f in pipe.stages[1].config.reward.functions}
    assert {"accuracy", "format", "language"} <= names
    final = pipe.stages[4].config.reward
    assert final.models and {f.name for f in final.functions} >= {"accuracy", "language"}
    assert main(["check", str(R1)]) == 0
    assert "pipeline of 5 stages" in capsys.readouterr().out
    assert main(["check", str(R1), "stages.rejection.rejection.filters=[bogus]"]) == 2


def test_summary_table_and_refusal_to_overwrite(tmp_path):
    from troupe.cluster.pipeline import STATE_FILE, run_pipeline, summary_table

    pipe = load_pipeline(_write(tmp_path, [{"kind": "sft", "name": "cold"}, {"kind": "grpo", "name": "rl"}]))
    state = {"stages": {"cold": {"status": "done", "policy": "/x/cold/model", "seconds": 12.4,
                                 "eval": {"eval/accuracy": 0.5, "eval/reward_mean": 0.625}},
                        "rl": {"status": "failed", "seconds": 3.0}}}
    table = summary_table(pipe, state).splitlines()
    assert table[2] == "| cold | sft | done | 0.500 | 0.625 | 12 | /x/cold/model |"
    assert table[3] == "| rl | grpo | failed | - | - | 3 | - |"
    pipe.folder.mkdir(parents=True)
    (pipe.folder / STATE_FILE).write_text(json.dumps(state))
    lines: list[str] = []
    assert run_pipeline(pipe, None, resume=False, say=lines.append) == 2
    assert "continue it with --resume" in lines[0]
    assert json.loads((pipe.folder / STATE_FILE).read_text()) == state  # nothing lost


def test_an_override_after_resume_stays_an_override():
    from troupe.cluster.cli import _parse

    args = _parse(["train", "x.yaml", "--resume", "stages.rl.steps=3"])
    assert args.resume == "latest" and args.overrides == ["stages.rl.steps=3"]
    args = _parse(["train", "x.yaml", "seed=1", "--resume", "runs/a/resume/step_2"])
    assert args.resume == "runs/a/resume/step_2" and args.overrides == ["seed=1"]


def test_a_grpo_stage_runs_ppo_with_a_critic_and_a_stage_without_one_is_named(tmp_path):
    """SFT -> PPO as two stages: the grpo stage kind takes the critic section (issue 27); a stage asking for gae
    without a critic fails with the stage's name."""
    pipe = load_pipeline(_write(tmp_path, [{"kind": "sft", "name": "cold"},
                                           {"kind": "grpo", "name": "ppo", "algo": {"advantage": "gae"},
                                            "critic": {"lr": 0.001, "freeze_policy_steps": 2}}]))
    ppo = pipe.stages[1].config
    assert ppo.algo.advantage.name == "gae" and ppo.critic.freeze_policy_steps == 2
    with pytest.raises(ConfigError, match=r"(?s)stages\[1\] 'ppo'.*add a critic section"):
        load_pipeline(_write(tmp_path, [{"kind": "sft", "name": "cold"},
                                        {"kind": "grpo", "name": "ppo", "algo": {"advantage": "gae"}}]))
