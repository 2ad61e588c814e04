"""``troupe rm train`` on the real stack (Ray actors, DeepSpeed ZeRO over gloo): it learns an easy
preference, 2 ranks train the same model as 1 rank on the same pairs (within the float32 bounds of
tests/tolerances.py), the folder it writes is a
reward model the scorer loads, and a bad pair row stops the command with file:line (exit 2)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _pairs(path: Path, n: int, seed: int = 0) -> None:
    """Easy pairs: the chosen response repeats the prompt's last digit, the rejected one does not."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            good = f"<answer>{a + b}</answer>"
            bad = f"<think>{a}</think>{rng.randint(0, 9)}"
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad}) + "\n")


def _config(tmp: Path, ranks: int, micro: int, **over) -> "object":
    from troupe.configs.schema import RewardModelTrainConfig

    raw = {"name": f"rm{ranks}", "output_dir": str(tmp / "runs"), "seed": 0,
           "model": {"path": "builtin:qwen2-tiny", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                     "intermediate_size": 64},
           "data": {"path": str(tmp / "pairs.jsonl"), "num_eval": 16},
           "train": {"epochs": 2, "batch_size": 16, "max_length": 48},
           "learner": {"num_ranks": ranks, "zero_stage": 2, "lr": 3e-3, "micro_batch_size": micro,
                       "num_cpus_per_rank": 0.5, "grad_clip": 1000.0}}
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return RewardModelTrainConfig.model_validate(raw)


@pytest.mark.ray
def test_rm_train_learns_and_two_ranks_equal_one(tmp_path, ray_local):
    from safetensors.torch import load_file
    from tolerances import adam_weight_atol, assert_same_adam_weights, grad_norm_rtol, loss_rtol, reduction_terms

    from troupe.cluster.rm_train import train_reward_model
    from troupe.reward.model import RewardModelScorer

    _pairs(tmp_path / "pairs.jsonl", 80)
    one = train_reward_model(_config(tmp_path, 1, 16), log=print)
    two = train_reward_model(_config(tmp_path, 2, 4), log=print)  # 2 ranks x 2 micro-batches of 4
    # ZeRO-3, 2 ranks x 2 micro-batches: caught ZeRO-3 keeping only the last micro-batch's gradient
    three = train_reward_model(_config(tmp_path, 2, 4, name="rm2z3", learner={"zero_stage": 3}), log=print)

    def steps(run: str) -> list[dict]:
        rows = [json.loads(x) for x in open(tmp_path / "runs" / run / "metrics.jsonl")]
        return [r for r in rows if "loss" in r]

    s1, s2, s3 = steps("rm1"), steps("rm2"), steps("rm2z3")
    assert len(s1) == len(s2) == len(s3) == 8  # 64 training pairs / 16 per step x 2 epochs
    # float32 bounds (tests/tolerances.py): the Bradley-Terry loss is a mean of 16 non-negative per-pair terms;
    # a weight's gradient sums over 16 pairs x 2 texts x <= 48 tokens and comes back through at most 6 matrix
    # products (score head, down, gate/up, o, v, embedding) of widths <= the vocabulary
    w1 = load_file(str(Path(one["model"]) / "model.safetensors"))
    vocab = max(v.shape[0] for k, v in w1.items() if k.endswith("embed_tokens.weight"))
    n_params = sum(v.numel() for k, v in w1.items() if k != "lm_head.weight")
    lrs = [r["lr"] for r in s1]
    n_terms = reduction_terms(16 * 2 * 48, widths=(32, 64, vocab), depth=6)
    w_atol = adam_weight_atol(lrs, n_terms, weight_scale=max(float(v.abs().max()) for v in w1.values()))
    for step, (a, b, c) in enumerate(zip(s1, s2, s3), start=1):
        rtol = loss_rtol(16, step, a["grad_norm"], n_params, w_atol, a["loss"])
        for other in (b, c):
            assert other["loss"] == pytest.approx(a["loss"], rel=rtol), (step, rtol)
            # later steps: plus the loss's weight term for the gradient too (an estimate, stated in the SFT test)
            assert other["grad_norm"] == pytest.approx(a["grad_norm"], rel=grad_norm_rtol(n_terms, n_params) + rtol)
    for other in (two, three):
        w = load_file(str(Path(other["model"]) / "model.safetensors"))
        assert_same_adam_weights(w, w1, lrs=lrs, n_terms=n_terms, betas=(0.9, 0.999))

    ev = one["epochs"]
    assert ev[0]["eval/pairs"] == 16
    # seeds 0-4 all reached 1.0 held-out pairwise accuracy (docs/results/test_margins.md); 16 held-out pairs
    assert ev[-1]["eval/accuracy"] >= 0.9 and ev[-1]["eval/margin"] > ev[0]["eval/margin"]
    assert s1[-1]["loss"] < s1[0]["loss"]
    scorer = RewardModelScorer(one["model"], normalize=True)
    stats = one["reward_stats"]
    assert scorer.stats["count"] == stats["count"] == 128 and stats["std"] > 0
    good, bad = scorer(["q"] * 2, ["<answer>12</answer>", "<think>1</think>3"], prompt_texts=["5+7=", "5+7="])
    assert good > bad


def test_bad_row_exit_2_names_line(tmp_path):
    lines = [json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"})] * 3 + [json.dumps({"prompt": "1+1=", "chosen": "2"})]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "rm.yaml").write_text(
        "model: {path: 'builtin:qwen2-tiny'}\ndata: {path: pairs.jsonl, num_eval: 1}\ntrain: {batch_size: 2}\n"
        f"output_dir: {tmp_path / 'runs'}\n")
    p = subprocess.run([sys.executable, "-m", "troupe.cluster.cli", "rm", "train", str(tmp_path / "rm.yaml")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "pairs.jsonl:4" in p.stderr and "rejected" in p.stderr
    p = subprocess.run([sys.executable, "-m", "troupe.cluster.cli", "rm", "train", str(tmp_path / "rm.yaml"),
                        "train.batch_size=3", "learner.num_ranks=2"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "learner.num_ranks" in p.stderr
