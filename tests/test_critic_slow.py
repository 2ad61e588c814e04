"""PPO with a learned critic on the real stack (issue 27): the critic's ZeRO ranks, and a PPO run end to end.

* The critic's update does not depend on how the batch is split: one ZeRO-2 rank with the whole batch and
  two ZeRO-3 ranks with micro-batches of 2 give the same values, value loss, gradient norm and updated values.
* A PPO run (``algo.advantage: gae``, KL per token in the reward, the critic on two ZeRO-3 ranks, the first
  step training the critic only) trains both models, and resumed from its step-2 checkpoint repeats step 3
  bit for bit, critic metrics included (the critic's weights, optimizer and RNG are in the checkpoint). A
  SIGKILLed run resumes from the same kind of checkpoint (tests/test_faults_slow.py shows that for GRPO).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    """2 prompts x G=4 of varied response lengths, with rewards (tests/test_learner_slow.py's shape)."""
    from troupe.core.types import Group, Prompt, Sample
    from troupe.learner.batch import collate_groups

    g = torch.Generator().manual_seed(1)
    groups = []
    for k, (plen, lens, rewards) in enumerate([(3, [9, 7, 12, 10], [1.0, 0.0, 0.5, 0.0]),
                                               (5, [1, 4, 2, 6], [0.0, 1.0, 1.0, 0.2])]):
        samples = [Sample(torch.randint(5, 40, (n,), generator=g).tolist(), [-3.0] * n, "", False, 0) for n in lens]
        groups.append(Group(Prompt(k, "", list(range(7, 7 + plen)), "q", "1"), samples, rewards=rewards))
    return collate_groups(groups, pad_id=0)


def test_critic_update_is_the_same_on_one_zero2_rank_and_two_zero3_ranks(tmp_path, ray_local):
    from troupe.cluster.learners import LearnerGroup
    from troupe.configs.schema import load_config
    from troupe.learner.critic_rank import CriticRank
    from troupe.learner.step import step_returns
    from troupe.learner.tiny_model import build_tiny_model

    ray = ray_local
    model = build_tiny_model(str(tmp_path / "m"), ["0123456789+=<think></think><answer></answer> abc"] * 20)
    batch = _batch()
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}}
    out = {}
    for ranks, stage, micro in ((1, 2, 8), (2, 3, 2)):
        cfg = load_config(REPO / "configs" / "arith_cpu.yaml", [
            "rollout.prompts_per_step=2", "rollout.group_size=4", "algo.advantage=gae", f"critic.num_ranks={ranks}",
            f"critic.zero_stage={stage}", f"critic.micro_batch_size={micro}", "critic.lr=0.01", "critic.grad_clip=1000"])
        C = ray.remote(CriticRank).options(num_cpus=0.5, runtime_env=env)
        port = _port()
        critic = LearnerGroup([C.remote(r, ranks, "127.0.0.1", port, model, cfg) for r in range(ranks)],
                              kind="critic rank")
        try:
            values = torch.cat(critic.call("values", batch))
            b = batch.with_(values=values)
            returns = step_returns(b, cfg.algo, 4, cfg.rollout.max_new_tokens)
            metrics = critic.call("train_step", b, returns)
            after = torch.cat(critic.call("values", batch))
        finally:
            critic.shutdown()
        out[ranks] = values, metrics, after
    (v1, m1, a1), (v2, m2, a2) = out[1], out[2]
    mask = batch.response_mask.bool()
    assert v1.shape == (8, batch.response_len) and (v1[~mask] == 0).all()
    assert torch.allclose(v1, v2, atol=1e-5)  # the same initial critic (seeded head), split or not
    loss1, loss2 = m1[0]["critic/value_loss"], sum(m["critic/value_loss"] for m in m2) / 2
    assert loss1 > 0 and loss1 == pytest.approx(loss2, rel=1e-5)
    assert m1[0]["critic/grad_norm"] == pytest.approx(m2[0]["critic/grad_norm"], rel=1e-4)
    assert not torch.allclose(a1, v1, atol=1e-4)  # the update moved the values
    assert torch.allclose(a1, a2, atol=1e-4)


def _steps(run_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("step", 0) >= 1 and not r.get("final")}


def _results(record: dict) -> dict:
    return {k: v for k, v in record.items() if "time" not in k and "seconds" not in k and k != "sync/logprob_max_diff"}


def test_ppo_run_trains_the_critic_and_resumes_bit_for_bit(tmp_path):
    from troupe.cluster.cli import main

    length = f"{REPO / 'tests' / 'e2e_rewards.py'}:length_reward"
    args = ["train", str(REPO / "configs" / "arith_cpu.yaml"), f"output_dir={tmp_path}",
            "sft.enabled=false", "data.options.num_train=512", "data.num_eval=8", "rollout.prompts_per_step=4",
            "rollout.group_size=4", "rollout.max_new_tokens=16", "learner.micro_batch_size=4",
            "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_engine=1", "learner.lr=0.001", "eval_every=0",
            f"reward.functions=[{{name: accuracy}}, {{name: '{length}', weight: 0.01}}]",
            "algo.advantage=gae", "algo.kl_in=reward", "algo.kl_coef=0.01", "critic.num_ranks=2", "critic.zero_stage=3",
            "critic.num_cpus_per_rank=0.25", "critic.lr=0.001", "critic.micro_batch_size=4",
            "critic.freeze_policy_steps=1", "steps=3", "checkpoint.every=2"]
    assert main([*args, "name=whole"]) == 0
    run = tmp_path / "whole"
    whole = _steps(run)
    assert sorted(whole) == [1, 2, 3]
    assert whole[1].get("policy_frozen") == 1.0 and "grad_norm" not in whole[1]  # step 1: the critic only
    assert all(whole[s]["grad_norm"] > 0 for s in (2, 3))
    for s in whole.values():
        assert s["critic/grad_norm"] > 0 and s["critic/value_loss"] > 0 and s["time/critic"] > 0
        assert {"critic/explained_variance", "critic/values_mean", "critic/returns_mean", "critic/clip_frac"} <= set(s)
    assert len({whole[s]["critic/values_mean"] for s in whole}) == 3  # the critic moves every step
    assert (run / "resume" / "step_2" / "critic").is_dir()
    assert "2 critic rank(s) (ZeRO-3)" in (run / "log.txt").read_text()

    # resume the finished run from its step-2 checkpoint (its latest): step 3 again, in the same folder
    assert main([*args, "name=whole", "--resume"]) == 0
    resumed = _steps(run)
    assert sorted(resumed) == [1, 2, 3]
    assert _results(resumed[3]) == _results(whole[3]), "step 3 differs after resume"
    assert "resumed from" in (run / "log.txt").read_text()
