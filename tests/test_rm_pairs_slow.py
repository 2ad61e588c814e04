"""``troupe rm pairs`` end to end (python -m troupe.cluster.rm_pairs): local Ray, a vLLM CPU engine, a reward worker.

A random tiny model rarely answers right, so the reward is the graded ``length_reward`` of
tests/e2e_rewards.py (characters / 100): samples of a group differ, and every group gives pairs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
LENGTH = f"{REPO / 'tests' / 'e2e_rewards.py'}:length_reward"
PROMPT_FORMAT = "Compute {question}. Think in <think></think>, answer in <answer></answer>.\n"
PROMPTS, N, K = 8, 4, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, a 24-row data file and a run config (1 engine, 4 prompts per generate call)."""
    from troupe.learner.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("rm_pairs")
    rows = [{"question": f"{a}+{b}", "answer": str(a + b), "uid": 100 + a} for a, b in zip(range(10, 34), range(40, 64))]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = [PROMPT_FORMAT.format(question=r["question"]) + f"<think></think><answer>{r['answer']}</answer>" for r in rows]
    model = build_tiny_model(str(root / "model"), corpus, hidden_size=64, num_heads=2, num_kv_heads=1,
                             intermediate_size=128, max_position_embeddings=256)
    cfg = {
        "name": "rm_pairs", "seed": 3, "device": "cpu",
        "model": {"path": model, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128},
        "data": {"source": "jsonl", "path": "data.jsonl", "template": "raw", "prompt_format": PROMPT_FORMAT,
                 "num_eval": 4, "max_prompt_tokens": 64},
        "rollout": {"num_engines": 1, "group_size": 8, "prompts_per_step": 4, "max_new_tokens": 12,
                    "num_cpus_per_engine": 1, "kv_cache_gib": 1, "max_model_len": 128},
        "reward": {"num_workers": 1, "functions": [{"name": LENGTH}, {"name": "format", "weight": 0.0}]},
        "learner": {"num_ranks": 1, "micro_batch_size": 32, "num_cpus_per_rank": 0.5},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root, model


def _pairs(root: Path, model: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "troupe.cluster.rm_pairs", str(root / "run.yaml"), *overrides,
           "--model", model, "--out", str(out), "--prompts", str(PROMPTS), "--n", str(N),
           "--pairs-per-prompt", str(K)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_pairs_from_own_samples_are_ranked_and_reproducible(setup):
    from troupe.cluster.prepare import load_task
    from troupe.configs.schema import load_config
    from troupe.rollout.preferences import load_pairs

    root, model = setup
    out = root / "pairs.jsonl"
    res = _pairs(root, model, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train_rows, _ = load_task(load_config(root / "run.yaml"))
    first = {r["uid"]: r for r in train_rows[:PROMPTS]}  # the first rows of the split, in load_task's order

    assert rows, res.stdout
    per_prompt: dict = {}
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "question", "answer", "uid"}
        src = first[r["uid"]]
        assert r["question"] == src["question"] and r["answer"] == src["answer"]
        assert r["prompt"] == PROMPT_FORMAT.format(question=src["question"])  # the templated prompt the policy saw
        assert r["chosen_reward"] > r["rejected_reward"]
        # the rewards are the texts' own (length / 100), the best and worst of the group
        assert r["chosen_reward"] == pytest.approx(len(r["chosen"]) / 100)
        assert r["rejected_reward"] == pytest.approx(len(r["rejected"]) / 100)
        per_prompt.setdefault(r["uid"], []).append((r["chosen"], r["rejected"]))
    for uid, pairs in per_prompt.items():
        assert len(pairs) <= K and len(set(pairs)) == len(pairs), uid
        assert len({len(c) for c, _ in pairs}) == 1 and len({len(w) for _, w in pairs}) == 1  # all best vs all worst
    assert len(per_prompt) >= PROMPTS // 2  # lengths differ in most groups of 4 random samples
    summary = res.stdout.strip().splitlines()[-1]
    assert f"{PROMPTS} prompts x {N} samples" in summary and f"{len(rows)} pairs written" in summary, summary

    # the file feeds `troupe rm train`: standard-format pairs
    loaded = load_pairs(out)
    assert [(p.prompt, p.chosen, p.rejected) for p in loaded] == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]

    # same command, same file (per-prompt sampling seeds, seeded pair choice), whatever the chunking
    again = root / "again.jsonl"
    _pairs(root, model, again, "rollout.prompts_per_step=3")
    assert again.read_bytes() == out.read_bytes()
    assert not list(root.glob("*.tmp"))
