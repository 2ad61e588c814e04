"""Run config: every shipped preset validates; bad files and values fail with the key named, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from troupe.cluster.cli import main
from troupe.configs.schema import ConfigError, apply_overrides, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
RM_PRESETS = sorted((REPO / "configs").glob("rm_*.yaml"))  # `troupe rm train` configs
PIPELINE_PRESETS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "\nstages:" in p.read_text())
PRESETS = sorted(set((REPO / "configs").glob("*.yaml")) - set(RM_PRESETS) - set(PIPELINE_PRESETS))


@pytest.mark.parametrize("path", PIPELINE_PRESETS, ids=lambda p: p.name)
def test_pipeline_presets_validate(path, capsys):
    from troupe.configs.pipeline import load_pipeline

    assert load_pipeline(path).stages
    assert main(["check", str(path)]) == 0


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_presets_validate(path, capsys, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # never download a preset's model or data set here (HF_HUB_OFFLINE=1, read at import); hub data sets fall
    # back to the preset's local files
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = load_config(path)
    assert cfg.batch_size % cfg.learner.num_ranks == 0
    missing = [i for i, m in enumerate(cfg.reward.models) if not (Path(m.path) / "config.json").exists()]
    if missing:  # a reward model written by an earlier command (make rm-demo): check names the missing folder
        assert main(["check", str(path)]) == 2
        assert f"reward.models.{missing[0]}.path" in capsys.readouterr().err
    elif not cfg.model.path.startswith("builtin:") and not Path(cfg.model.path).is_dir():
        # a hub id not in this machine's HF cache (the GPU preset), or a policy an earlier command writes:
        # check says so before anything starts
        assert main(["check", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"model.path {cfg.model.path!r}: not a local folder" in err or \
            f"model.path {cfg.model.path!r}: no such folder here" in err
    else:
        assert main(["check", str(path)]) == 0


@pytest.mark.parametrize("path", RM_PRESETS, ids=lambda p: p.name)
def test_rm_presets_validate(path):
    from troupe.configs.schema import RewardModelTrainConfig

    cfg = RewardModelTrainConfig.model_validate(yaml.safe_load(path.read_text()))
    assert cfg.train.batch_size % cfg.learner.num_ranks == 0


def _write(folder: Path, name: str, data: dict) -> Path:
    p = folder / name
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load((REPO / "configs" / "arith_cpu.yaml").read_text())


def test_dump_roundtrip(tmp_path):
    cfg = load_config(REPO / "configs" / "gsm8k_cpu.yaml")
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["rollout"].update(group_sizee=4), "rollout.group_sizee: unknown key"),
        (lambda d: d["rollout"].update(group_size=1), "rollout.group_size"),
        (lambda d: d["algo"].update(advantage="ppo"), "algo.advantage"),
        (lambda d: d["learner"].update(zero_stage=4), "learner.zero_stage"),
        (lambda d: d["learner"].update(num_ranks=3), "divisible by learner.num_ranks = 3"),
        (lambda d: d.update(device="gpu"), "device 'gpu' needs"),
        (lambda d: d["data"].update(prompt_format="no placeholder"), "data.prompt_format"),
        (lambda d: d["data"].update(source="arith"), "data.source must be one of"),
        (lambda d: d["sft"].update(carry_slip=0.7), "sft.carry_slip: unknown key"),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
    ],
)
def test_bad_values_name_the_key_and_exit_2(tmp_path, capsys, mutate, needle):
    data = _base()
    mutate(data)
    path = _write(tmp_path, "bad.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value) and str(path) in str(e.value)
    assert main(["check", str(path)]) == 2
    assert needle in capsys.readouterr().err


def test_overrides_apply_and_are_validated(tmp_path, capsys):
    path = REPO / "configs" / "arith_cpu.yaml"
    cfg = load_config(path, ["algo.kl_coef=0.05", "rollout.group_size=16", "algo.policy_loss.dual_clip=3"])
    assert cfg.algo.kl_coef == 0.05 and cfg.rollout.group_size == 16 and cfg.algo.policy_loss.dual_clip == 3.0
    assert main(["check", str(path), "algo.kl_coef=-1"]) == 2
    assert "algo.kl_coef" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["algo.kl_coef"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "broken.yaml"
    p.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    data = yaml.safe_load((REPO / "configs" / "gsm8k_cpu.yaml").read_text())
    data["data"]["path"] = "missing.jsonl"
    with pytest.raises(ConfigError, match="data.path: file not found"):
        load_config(_write(tmp_path, "c.yaml", data))


def test_bad_data_row_fails_before_any_actor(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2"}\n')
    data = yaml.safe_load((REPO / "configs" / "gsm8k_cpu.yaml").read_text())
    data["data"]["path"] = str(rows)
    assert main(["check", str(_write(tmp_path, "c.yaml", data))]) == 2
    err = capsys.readouterr().err
    assert f"{rows}:2" in err and "answer" in err


def test_cli_exit_status_from_the_installed_script(tmp_path):
    data = _base()
    data["learner"]["lr"] = 0
    path = _write(tmp_path, "bad.yaml", data)
    troupe = Path(sys.executable).parent / "troupe"
    out = subprocess.run([str(troupe), "train", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "learner.lr" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_algo_variants_match_the_maths_registries():
    """Every variant a config accepts selects an implementation, and every implementation is selectable."""
    from typing import get_args

    from troupe.configs.algos import ADVANTAGE_CONFIGS, POLICY_LOSS_CONFIGS
    from troupe.configs.schema import AlgoConfig
    from troupe.learner import grpo

    def values(field):
        return set(get_args(AlgoConfig.model_fields[field].annotation))

    registered = grpo.registered()
    assert set(ADVANTAGE_CONFIGS.names()) == set(registered["advantage"]) >= {"grpo", "dr_grpo", "rloo", "process"}
    assert set(POLICY_LOSS_CONFIGS.names()) == set(registered["policy_loss"]) >= {"ppo_clip", "gspo"}
    required = {"distill": {"teacher": "a/teacher"}}  # variants with a field that has no default
    for name in registered["advantage"]:
        assert AlgoConfig(advantage={"name": name, **required.get(name, {})}).advantage.name == name
    for name in registered["policy_loss"]:
        assert AlgoConfig(policy_loss={"name": name}).policy_loss.name == name
    assert values("loss_agg") == set(grpo.LOSS_AGG_MODES)
    assert values("kl_estimator") == set(grpo.KL_ESTIMATORS)
