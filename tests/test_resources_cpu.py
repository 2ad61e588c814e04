"""``troupe check``'s resource table (troupe.cluster.resources): what each preset asks for, when a run could
never be placed, and the learner memory estimate's arithmetic (ZeRO paper, section 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from troupe.cluster.resources import ModelShape, demands, learner_memory, model_shape, report
from troupe.configs.schema import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Qwen2.5-1.5B's published shape (its config.json): what the GPU presets train
QWEN_1_5B = ModelShape(params=1_543_714_304, vocab=151_936, hidden=1536, layers=28, heads=12)


@pytest.mark.parametrize("preset,cpus,gpus", [("gsm8k_qwen2.5_1.5b_gpu.yaml", 36, 8),
                                              ("gsm8k_qwen2.5_1.5b_4gpu.yaml", 18, 4)])
def test_each_gpu_preset_asks_for_what_its_header_says(preset, cpus, gpus):
    cfg = load_config(CONFIGS / preset)
    ds = demands(cfg)
    assert sum(d.count * d.cpus for d in ds) == cpus and sum(d.count * d.gpus for d in ds) == gpus
    assert f"{gpus} GPUs and {cpus} CPUs" in (CONFIGS / preset).read_text().replace("\n# ", " ")
    lines, warnings = report(cfg, {"cpus": 64, "gpus": 8, "largest_node": {"cpus": 64, "gpus": 8}}, QWEN_1_5B)
    assert warnings == [] and any(line.startswith(f"total: {cpus} CPUs") for line in lines)


def test_a_run_that_could_never_be_placed_is_warned_about():
    cfg = load_config(CONFIGS / "gsm8k_qwen2.5_1.5b_gpu.yaml")
    _, warnings = report(cfg, {"cpus": 64, "gpus": 4, "largest_node": {"cpus": 64, "gpus": 4}}, None, "the cluster")
    assert len(warnings) == 1 and "needs 36 CPUs and 8 GPUs; the cluster has 64 and 4" in warnings[0]
    _, warnings = report(cfg, {"cpus": 64, "gpus": 8, "largest_node": {"cpus": 2, "gpus": 1}}, None, "the cluster")
    assert len(warnings) == 1 and "one engine asks for 4 CPUs and 1 GPUs; the largest node" in warnings[0]


def test_the_embedded_cluster_shares_cores_without_a_warning():
    cfg = load_config(CONFIGS / "arith_cpu.yaml", ["rollout.num_engines=3"])
    lines, warnings = report(cfg, {"cpus": 2, "gpus": 0, "memory_bytes": 2**40, "embedded": True}, None)
    assert warnings == [] and any("advertises 4 CPUs on 2 cores" in line for line in lines)


def test_zero_stages_partition_what_the_zero_paper_says():
    P, N = QWEN_1_5B.params, 4
    mem = {s: learner_memory(QWEN_1_5B, load_config(CONFIGS / "gsm8k_qwen2.5_1.5b_gpu.yaml", [f"learner.zero_stage={s}"]))
           for s in (0, 1, 2, 3)}
    assert mem[0]["weights"] == mem[2]["weights"] == 2 * P and mem[3]["weights"] == 2 * P / N
    assert mem[1]["gradients"] == 2 * P and mem[2]["gradients"] == mem[3]["gradients"] == 2 * P / N
    assert mem[0]["optimizer"] == 12 * P and mem[1]["optimizer"] == 12 * P / N
    assert mem[3]["reference"] == 2 * P / N and mem[2]["reference"] == 2 * P  # kl_coef > 0: a frozen copy
    assert mem[3]["total"] == sum(v for k, v in mem[3].items() if k != "total")
    # the preset (micro-batch 8, 512 + 1024 tokens, gradient checkpointing): logits in bf16 plus 3 float32 chunks
    assert mem[3]["logits"] == 8 * 1536 * 151_936 * 2 + 3 * 1024 * 151_936 * 4
    assert mem[3]["activations"] == 28 * 1536 * 8 * 1536 * 2


def test_model_shape_counts_a_folders_parameters_without_loading_them(tmp_path):
    from transformers import AutoModelForCausalLM

    from troupe.learner.tiny_model import build_tiny_model

    path = build_tiny_model(str(tmp_path / "m"), ["12+34=46 <think></think><answer>46</answer>"] * 20)
    shape = model_shape(load_config(CONFIGS / "arith_cpu.yaml", [f"model.path={path}"]))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.params == sum(p.numel() for p in model.parameters()) and shape.vocab == model.config.vocab_size
    assert model_shape(load_config(CONFIGS / "arith_cpu.yaml", [f"model.path={tmp_path / 'missing'}"])) is None
