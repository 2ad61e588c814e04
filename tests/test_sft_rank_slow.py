"""SFT on DeepSpeed ZeRO ranks (Ray actors) on the real stack: ``troupe.cluster.sft_train.train_sft``.

2 ranks under ZeRO-2, and 2 ranks under ZeRO-3 with 2 micro-batches each, train the same model as
1 rank that splits each step into micro-batches (per-step loss and every weight to rel 1e-5 / 1e-4:
the token-mean loss over the whole step does not depend on the split); 2 ranks under ZeRO-3 memorise a handful of repeated examples, and the folder
they write (gathered collectively) loads with transformers and in a vLLM engine whose greedy
output is the memorised completion.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FACTS = [("Q: capital of France?\nA: ", "Paris"), ("Q: 12+34=\nA: ", "46"), ("Q: colour of the sky?\nA: ", "blue"),
         ("Q: 7*6=\nA: ", "42, the answer")]


def _config(model: str, ranks: int, micro: int, stage: int, steps: int, batch: int, lr: float):
    from troupe.configs.schema import RunConfig

    return RunConfig.model_validate({
        "seed": 0, "model": {"path": model}, "data": {"source": "jsonl", "path": "unused.jsonl"},
        "rollout": {"prompts_per_step": 2, "group_size": 4},
        "learner": {"num_ranks": ranks, "zero_stage": stage, "micro_batch_size": micro, "num_cpus_per_rank": 0.5},
        "sft": {"steps": steps, "batch_size": batch, "lr": lr}})


@pytest.mark.ray
def test_two_ranks_zero2_equal_one_rank_with_micro_batches(tmp_path, ray_local):
    import torch
    from safetensors.torch import load_file

    from troupe.cluster.sft_train import train_sft
    from troupe.learner.tiny_model import build_tiny_model

    # completions of very different lengths, so a mean of micro-batch means would differ from the token mean
    examples = [(f"{a}+{b}=", " ".join(str(a + b)) * (1 + (a * b) % 4)) for a, b in
                [(12, 7), (3, 40), (25, 25), (9, 9), (61, 2), (17, 30), (8, 44), (50, 1), (33, 3), (2, 2), (70, 6),
                 (14, 41)]]
    model = build_tiny_model(str(tmp_path / "m"), [p + c for p, c in examples] * 4, hidden_size=32, num_layers=1,
                             num_heads=1, num_kv_heads=1, intermediate_size=64, max_position_embeddings=128)
    runs = {}
    # 1 rank: 4 micro-batches of 2; 2 ranks: one micro-batch of 4 each; ZeRO-0 (troupe's own grad norm): 1 of 8;
    # ZeRO-3 on 2 ranks with 2 micro-batches of 2 each (caught ZeRO-3 keeping only the last micro-batch's gradient)
    for name, ranks, micro, stage in (("r1", 1, 2, 2), ("r2", 2, 4, 2), ("z0", 1, 8, 0), ("z3", 2, 2, 3)):
        out = tmp_path / name / "model"
        res = train_sft(_config(model, ranks, micro, stage, steps=5, batch=8, lr=3e-3), model, examples, str(out))
        rows = [json.loads(x) for x in open(tmp_path / name / "metrics.jsonl")]
        assert res["steps"] == 5 and res["model"] == str(out) and len(rows) == 5
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(r["stage"] == "sft" for r in rows)
        runs[name] = (rows, load_file(str(out / "model.safetensors")))
    (rows1, w1), (rows2, w2) = runs["r1"], runs["r2"]
    first0 = runs["z0"][0][0]
    assert first0["loss"] == pytest.approx(rows1[0]["loss"], rel=1e-5)
    assert first0["grad_norm"] == pytest.approx(rows1[0]["grad_norm"], rel=1e-4)
    for a, b in zip(rows1, rows2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"] and b["lr"] == a["lr"]
    # warm-up over 1 step (5% of 5, at least 1), then cosine decay to 10% of sft.lr
    assert rows1[0]["lr"] == rows1[1]["lr"] == pytest.approx(3e-3) and rows1[-1]["lr"] < rows1[1]["lr"]
    assert w1.keys() == w2.keys()
    init = load_file(str(Path(model) / "model.safetensors"))
    assert any(not torch.equal(w1[k], init[k]) for k in init), "training changed no weight"
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    rows3, w3 = runs["z3"]
    for a, b in zip(rows1, rows3):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    for k in w1:
        torch.testing.assert_close(w3[k], w1[k], rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_zero3_memorises_and_saved_folder_loads_in_transformers_and_vllm(tmp_path, ray_local):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from troupe.cluster.sft_train import train_sft
    from troupe.configs.schema import RolloutConfig
    from troupe.core.types import Prompt, Sampling
    from troupe.learner.tiny_model import build_tiny_model
    from troupe.rollout.engine import RolloutEngine

    ray = ray_local
    model = build_tiny_model(str(tmp_path / "m"), [p + c for p, c in FACTS] * 10, hidden_size=64, num_layers=2,
                             num_heads=2, num_kv_heads=1, intermediate_size=128, max_position_embeddings=256)
    out = str(tmp_path / "sft" / "model")
    lines = []
    res = train_sft(_config(model, 2, 2, 3, steps=60, batch=4, lr=1e-2), model, FACTS, out, log=lines.append,
                    log_every=20)
    print(res)
    assert res["loss_last"] < 0.05 < res["loss_first"], res
    assert any(line.startswith("sft step 60/60 loss") for line in lines), lines

    tok = AutoTokenizer.from_pretrained(out)
    hf = AutoModelForCausalLM.from_pretrained(out)
    for prompt, completion in FACTS:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            gen = hf.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        assert tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True) == completion

    engine = ray.remote(RolloutEngine).options(num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}
                                               ).remote(out, RolloutConfig(max_model_len=256), dtype="float32")
    try:
        ray.get(engine.ready.remote())
        prompts = [Prompt(i, p, tok(p, add_special_tokens=False)["input_ids"], p, c) for i, (p, c) in enumerate(FACTS)]
        groups = ray.get(engine.generate.remote(prompts, Sampling(n=1, max_new_tokens=16, temperature=0.0)))
        for g, (_, completion) in zip(groups, FACTS):
            s = g.samples[0]
            assert s.text == completion and s.response_ids[-1] == tok.eos_token_id and not s.truncated
    finally:
        ray.kill(engine)
