"""A pipeline on the real stack (local Ray, vLLM CPU engines, DeepSpeed ranks): SFT -> GRPO ->
rejection sampling, a stage that fails and names itself, and ``--resume`` at that stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from troupe.cluster.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


def _pipeline(tmp_path: Path) -> Path:
    base = {
        "name": "pipe", "output_dir": str(tmp_path), "seed": 0, "device": "cpu",
        "model": {"path": "builtin:qwen2-tiny", "hidden_size": 64, "num_layers": 1, "num_heads": 2,
                  "intermediate_size": 128},
        "data": {"source": "troupe.demo.arith:ArithTask", "template": "raw", "prompt_format": "{question}\n",
                 "num_eval": 8, "max_prompt_tokens": 64,
                 "options": {"num_train": 256, "min_operand": 10, "max_operand": 99, "zh_share": 0.3, "zh_mixing": 0.5}},
        "sft": {"steps": 30, "batch_size": 16, "lr": 0.003, "num_examples": 128},
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_new_tokens": 24, "num_cpus_per_engine": 1,
                    "kv_cache_gib": 1, "max_model_len": 128},
        "reward": {"functions": [{"name": "accuracy"}, {"name": "language", "weight": 0.5}]},
        "learner": {"micro_batch_size": 16, "lr": 0.001, "num_cpus_per_rank": 0.5, "torch_threads": 1},
        "stages": [
            {"kind": "sft", "name": "cold"},
            {"kind": "grpo", "name": "rl", "steps": 2, "algo": {"policy_loss": "nan_loss"},
             "cluster": {"max_nonfinite_steps": 1}},
            {"kind": "rejection_sampling", "name": "rs", "sft": {"steps": 5, "batch_size": 4},
             "learner": {"micro_batch_size": 4},
             "rejection": {"num_prompts": 8, "n": 4, "filters": ["dedup"], "max_per_prompt": 2}},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_pipeline_stage_failure_names_the_stage_and_resume_continues_there(tmp_path, monkeypatch):
    import fault_plugins  # noqa: F401  (registers algo.policy_loss 'nan_loss'; the ranks import it by name)

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    path = _pipeline(tmp_path)
    folder = tmp_path / "pipe"

    # first attempt: the GRPO stage's loss is NaN -> the run stops -> the pipeline names the stage
    assert main(["train", str(path)]) == 1
    state = json.loads((folder / "pipeline_state.json").read_text())
    assert state["stages"]["cold"]["status"] == "done"
    assert state["stages"]["rl"]["status"] == "failed" and "rs" not in state["stages"]
    log = (folder / "log.txt").read_text()
    assert "stages[1] 'rl' (grpo) failed" in log and f"troupe train {path} --resume" in log
    sft_model = folder / "cold" / "model" / "model.safetensors"
    assert sft_model.exists() and 0.0 <= state["stages"]["cold"]["eval"]["eval/accuracy"] <= 1.0
    sft_mtime = sft_model.stat().st_mtime_ns
    # without --resume the folder is not overwritten
    assert main(["train", str(path)]) == 2

    # resume with the loss fixed: the SFT stage is kept as it is, the GRPO stage and the rest run
    assert main(["train", str(path), "stages.rl.algo.policy_loss=ppo_clip", "--resume"]) == 0
    assert sft_model.stat().st_mtime_ns == sft_mtime
    state = json.loads((folder / "pipeline_state.json").read_text())
    assert [state["stages"][s]["status"] for s in ("cold", "rl", "rs")] == ["done"] * 3
    log = (folder / "log.txt").read_text()
    assert "stages[0] 'cold' (sft): done earlier" in log
    # each stage starts from the policy the previous one wrote
    rl_cfg = yaml.safe_load((folder / "rl" / "config.yaml").read_text())
    assert rl_cfg["model"]["path"] == str(folder.resolve() / "cold" / "model")
    rs_cfg = yaml.safe_load((folder / "rs" / "config.yaml").read_text())
    assert rs_cfg["model"]["path"] == state["stages"]["rl"]["policy"] == str(folder.resolve() / "rl" / "checkpoints" / "final")
    metrics = [json.loads(x) for x in (folder / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in metrics if r.get("step", 0) >= 1 and not r.get("final")) == [1, 2]
    # rejection sampling wrote its data set and the SFT on it wrote the last policy
    rows = [json.loads(x) for x in (folder / "rs" / "sft_data.jsonl").read_text().splitlines()]
    assert rows and all(r["completion"] for r in rows)
    assert (folder / "rs" / "model" / "model.safetensors").exists()
    summary = (folder / "summary.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in summary[4:7]] == ["cold", "rl", "rs"]
    assert all(line.split("|")[3].strip() == "done" for line in summary[4:7])
    for name in ("cold", "rl", "rs"):
        acc = state["stages"][name]["eval"]["eval/accuracy"]
        assert 0.0 <= acc <= 1.0
