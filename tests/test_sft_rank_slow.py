"""SFT on DeepSpeed ZeRO ranks (Ray actors) on the real stack: ``troupe.cluster.sft_train.train_sft``.

2 ranks under ZeRO-2, and 2 ranks under ZeRO-3 with 2 micro-batches each, train the same model as
1 rank that splits each step into micro-batches (the token-mean loss over the whole step does not
depend on the split: per-step loss, gradient norm and every weight agree within the float32 bounds of
tests/tolerances.py, derived from the reduction order, not from one machine's run); 2 ranks under ZeRO-3 memorise a handful of repeated examples, and the folder
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
    from tolerances import (
        adam_weight_atol,
        assert_same_adam_weights,
        grad_norm_rtol,
        loss_rtol,
        reduction_terms,
        sum_rtol,
    )

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
    init = load_file(str(Path(model) / "model.safetensors"))
    assert any(not torch.equal(w1[k], init[k]) for k in init), "training changed no weight"
    # float32 bounds (tests/tolerances.py): the gradient of a weight sums over the step's tokens and comes back
    # through at most 6 matrix products (lm_head, down, gate/up, o, v, embedding) of widths <= the vocabulary
    n_params = sum(v.numel() for k, v in w1.items() if k != "lm_head.weight")  # tied to the embedding
    lrs = [r["lr"] for r in rows1]
    n_terms = reduction_terms(max(r["tokens"] for r in rows1), widths=(32, 64, len(init["model.embed_tokens.weight"])),
                              depth=6)
    w_atol = adam_weight_atol(lrs, n_terms, weight_scale=max(float(v.abs().max()) for v in w1.values()))

    def same_run(rows: list[dict], w: dict) -> None:
        for step, (a, b) in enumerate(zip(rows1, rows), start=1):
            rtol = loss_rtol(a["tokens"], step, a["grad_norm"], n_params, w_atol, a["loss"])
            assert b["loss"] == pytest.approx(a["loss"], rel=rtol), (step, rtol)
            # at step > 1 the gradient also moves with the weights' difference: that part is taken as the loss's
            # (the same Cauchy-Schwarz term; an estimate, the Hessian is not bounded here)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=grad_norm_rtol(n_terms, n_params) + rtol), step
            assert b["tokens"] == a["tokens"] and b["lr"] == a["lr"]
        assert_same_adam_weights(w, w1, lrs=lrs, n_terms=n_terms, betas=(0.9, 0.999))

    first0 = runs["z0"][0][0]
    assert first0["loss"] == pytest.approx(rows1[0]["loss"], rel=sum_rtol(rows1[0]["tokens"]))
    assert first0["grad_norm"] == pytest.approx(rows1[0]["grad_norm"], rel=grad_norm_rtol(n_terms, n_params))
    # warm-up over 1 step (5% of 5, at least 1), then cosine decay to 10% of sft.lr
    assert rows1[0]["lr"] == rows1[1]["lr"] == pytest.approx(3e-3) and rows1[-1]["lr"] < rows1[1]["lr"]
    same_run(rows2, w2)
    same_run(*runs["z3"])


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
    # seeds 0-4 ended at 0.0030-0.0126 (docs/results/test_margins.md): the bound has a 4x margin
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
