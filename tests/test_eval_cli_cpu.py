"""`troupe eval` argument and config errors (exit 2, message names the problem), before any actor starts."""

from __future__ import annotations

import json

import pytest

from troupe.cluster.cli import main
from troupe.cluster.eval_cli import find_run_config, format_table


def _model_folder(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return path


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "is not a model folder (no config.json)" in capsys.readouterr().err


def test_config_found_in_the_run_folder_or_asked_for(tmp_path, capsys):
    ckpt = _model_folder(tmp_path / "run" / "checkpoints" / "final")
    assert find_run_config(ckpt) is None
    assert main(["eval", str(ckpt)]) == 2
    assert "give the run config with --config" in capsys.readouterr().err
    (tmp_path / "run" / "config.yaml").write_text("model: {path: x}\n")
    assert find_run_config(ckpt) == tmp_path / "run" / "config.yaml"


def test_bad_k_and_bad_config(tmp_path, capsys):
    ckpt = _model_folder(tmp_path / "m")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(ckpt), "--k", "1,x"])
    assert e.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
    # k larger than n: the config's own check names eval.k
    assert main(["eval", str(ckpt), "--config", "configs/arith_cpu.yaml", "--n", "2", "--k", "1,4"]) == 2
    assert "eval.k [4]" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--config", "configs/arith_cpu.yaml", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_table_lists_pass_maj_and_functions():
    t = format_table({"eval/pass@1": 0.5, "eval/pass@4": 0.75, "eval/maj@4": 0.625, "eval/accuracy": 0.5,
                      "eval/reward_mean": 0.6, "eval/response_len_mean": 12.0, "eval/reward/exact_mean": 0.5}, [1, 4])
    lines = t.splitlines()
    assert lines[0].split() == ["pass@1", "0.5000"] and lines[2].split() == ["maj@4", "0.6250"]
    assert "maj@1" not in t and lines[-1].split() == ["reward/exact_mean", "0.5000"]
