"""Iterative RL on the real stack (local Ray, reward-model actors, a DeepSpeed reward-model trainer, vLLM CPU
engines): a reward-model weight refresh reaches every actor of the lane (and a replaced or Ray-restarted
actor), and a short GRPO run retrains its reward model after every step.

The reward model is the tiny ``rm_dir`` fixture (tests/conftest.py); "other weights" are that model with
its scalar head and last norm perturbed (seeded), saved with other reward stats.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from troupe.configs.schema import RewardConfig, RewardModelConfig
from troupe.core.types import Group, Prompt, Sample

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
LENGTH = f"{REPO / 'tests' / 'e2e_rewards.py'}:length_reward"


def _group(uid: int) -> Group:
    prompt = Prompt(uid=uid, text=f"What is {uid}+3? ", token_ids=[], question=f"{uid}+3", answer=str(uid + 3))
    return Group(prompt, [Sample([], [], t, False, 0) for t in
                          (f"<think>x</think><answer>{uid + 3}</answer>", "Write a poem about the sea.", "7")])


def _expected(folder: str, g: Group) -> list[float]:
    from troupe.reward.model import RewardModelScorer, reward_text

    scorer = RewardModelScorer(folder)
    return scorer.score_texts([reward_text(g.prompt.text, s.text, scorer.tokenizer.eos_token) for s in g.samples])


@pytest.fixture(scope="module")
def other_rm(rm_dir, tmp_path_factory) -> str:
    """``rm_dir`` with other weights and other stats (a new version of the same model)."""
    import torch

    from troupe.reward.model import load_reward_model, save_reward_model

    model = load_reward_model(rm_dir)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=gen))
    return save_reward_model(model, str(tmp_path_factory.mktemp("rm_v1") / "v1"), rm_dir,
                             stats={"mean": -0.3, "std": 2.0, "count": 4})


def _scores_of_each_actor(ray, pool, g: Group) -> list[list[float]]:
    return [out[0].reward_parts["rm"] for out in ray.get([w.score.remote([g]) for w in pool.workers], timeout=120)]


def test_refresh_reaches_every_reward_model_actor(ray_local, rm_dir, other_rm):
    from fault_plugins import wait_until_dead

    from troupe.reward.router import RewardRouter

    ray = ray_local
    g = _group(4)
    v0, v1 = _expected(rm_dir, g), _expected(other_rm, g)
    assert max(abs(a - b) for a, b in zip(v0, v1)) > 1e-2  # the two versions score differently
    router = RewardRouter(RewardConfig(functions=[], models=[
        RewardModelConfig(path=rm_dir, name="rm", num_workers=2, num_cpus=0.5, batch_size=4)]))
    try:
        pool = router.lanes["rm"]
        assert router.model_versions("rm") == [0, 0]
        for scores in _scores_of_each_actor(ray, pool, g):
            assert scores == pytest.approx(v0, abs=1e-5)

        assert router.refresh_model("rm", other_rm, 1, timeout=120) == [1, 1]
        assert router.model_versions("rm") == [1, 1]
        for scores in _scores_of_each_actor(ray, pool, g):  # every actor, asked directly
            assert scores == pytest.approx(v1, abs=1e-5)
        assert router.score_now([g], timeout=120)[0].reward_parts["rm"] == pytest.approx(v1, abs=1e-5)
        assert router.refresh_model("rm", other_rm, 1, timeout=120) == [1, 1]  # the same version again: no reload

        # an actor Ray restarts comes back with its first arguments (version 0) and catches up on its next
        # batch: the pool's batches name the version they are to be scored with
        first = pool.workers[0]
        ray.kill(first, no_restart=False)
        deadline, versions = time.monotonic() + 120, None
        while versions != {"rm": 0} and time.monotonic() < deadline:  # until the restarted process answers
            try:
                versions = ray.get(first.model_versions.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                time.sleep(0.5)
        assert versions == {"rm": 0}
        out = router.score_now([g], timeout=180)  # an idle pool sends to slot 0: the restarted actor
        assert pool.workers[0] is first and pool.restarts == 0
        assert out[0].reward_parts["rm"] == pytest.approx(v1, abs=1e-5)
        assert router.model_versions("rm") == [1, 1]

        # an actor killed for good is replaced by the pool, and the replacement starts from the new folder
        ray.kill(first, no_restart=True)
        wait_until_dead(ray, first.ping.remote, 30)
        out = router.score_now([g], timeout=180)
        assert pool.restarts == 1 and pool.workers[0] is not first
        assert out[0].reward_parts["rm"] == pytest.approx(v1, abs=1e-5)
        assert router.model_versions("rm") == [1, 1]
        for scores in _scores_of_each_actor(ray, pool, g):
            assert scores == pytest.approx(v1, abs=1e-5)
    finally:
        router.shutdown()


def test_grpo_retrains_its_reward_model_every_step(rm_dir, tmp_path):
    """3 GRPO steps with ``reward.iterative.every: 1`` (``troupe train``, as a user runs it): a round after
    every step (v1, v2, v3 written; the fresh pairs labelled by a weight-0 function), replay from the data
    file, the checkpoint keeps the iterative state, the final evaluation is scored by v3 in the actors; then
    ``--resume`` from the step-2 checkpoint continues from v2."""
    from safetensors.torch import load_file

    from troupe.cluster.cli import main
    from troupe.reward.model import RewardModelScorer, reward_text

    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # this test starts its own cluster, as `troupe train` does
        ray.shutdown()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "chosen": f"<answer>{2 * a}</answer>",
                                         "rejected": f"{a}"}) + "\n" for a in range(10, 40)))
    prompt_format = "Compute {question}. Think in <think></think>, answer in <answer></answer>.\n"
    args = ["train", str(REPO / "configs" / "arith_cpu.yaml"), f"output_dir={tmp_path}", "name=it",
            "sft.enabled=false", "data.options.num_train=256", "data.num_eval=8",
            "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=16",
            "learner.num_ranks=1", "learner.micro_batch_size=16", "learner.num_cpus_per_rank=1",
            "rollout.num_cpus_per_engine=1", "checkpoint.every=2", "tensorboard=false",
            f"reward.functions=[{{name: accuracy, weight: 0.0}}, {{name: '{LENGTH}', weight: 0.0}}]",
            f"reward.models=[{{path: '{rm_dir}', name: rm, num_cpus: 0, batch_size: 16, max_length: 200}}]",
            f"reward.iterative={{every: 1, label: '{LENGTH}', pairs_per_prompt: 2, replay: 0.25, epochs: 3, "
            f"lr: 0.003, batch_size: 4, data: '{pairs}'}}"]
    assert main(args + ["steps=3"]) == 0
    run = tmp_path / "it"
    steps = _steps(run)
    assert [r["rm/version"] for r in steps] == [1, 2, 3]
    root = run / "reward_models" / "rm"
    for k, r in enumerate(steps, start=1):
        assert 1 <= r["rm/fresh_pairs"] <= 8 and r["rm/pending_pairs"] == 0  # <= 4 groups x 2 pairs
        assert r["rm/replay_pairs"] == int(r["rm/fresh_pairs"] / 3 + 0.5)  # 0.25 / 0.75 of the fresh ones
        assert 0.0 <= r["rm/acc_before"] <= 1.0 and 0.0 <= r["rm/acc_after"] <= 1.0
        assert r["rm/margin_after"] > r["rm/margin_before"]  # 3 epochs on these pairs widen their margin
        assert r["rm/train_steps"] == 3 * -(-(r["rm/fresh_pairs"] + r["rm/replay_pairs"]) // 4)
        v = root / f"v{k}"
        assert {"config.json", "model.safetensors", "reward_stats.json", "fresh_pairs.jsonl"} <= {p.name for p in v.iterdir()}
        assert len((v / "fresh_pairs.jsonl").read_text().splitlines()) == r["rm/fresh_pairs"]
        stats = json.loads((v / "reward_stats.json").read_text())
        assert stats["count"] == 60 and stats["mean"] == pytest.approx(r["rm/stats_mean"])  # the data file's texts
    w0, w3 = load_file(f"{rm_dir}/model.safetensors"), load_file(str(root / "v3" / "model.safetensors"))
    assert max(float((w3[k] - w0[k]).abs().max()) for k in w0) > 1e-3
    state = json.loads((run / "resume" / "step_2" / "trainer_state.json").read_text())
    assert state["iterative"] == {"version": 2, "folder": str(root / "v2"), "pending": []}

    # the held-out evaluation after step 3 was scored by the actors with v3 (normalised by v3's stats)
    scorer = RewardModelScorer(str(root / "v3"), max_length=200)
    final = [json.loads(line) for line in (run / "eval_final.jsonl").read_text().splitlines()]
    expected = scorer.score_texts([reward_text(prompt_format.format(question=row["question"]), row["completion"],
                                               scorer.tokenizer.eos_token) for row in final])
    assert [row["parts"]["rm"] for row in final] == pytest.approx(expected, abs=1e-4)
    assert "reward model rm v3 (after step 3): accuracy on" in (run / "log.txt").read_text()

    # resumed from step 2 (v2 in the checkpoint): the lane and the trainer continue from v2, so step 3 repeats
    # the uninterrupted step 3 up to its round's training (the trainer's AdamW moments start afresh)
    assert main(args + ["steps=4", "--resume"]) == 0
    again = _steps(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4] and [r["rm/version"] for r in again] == [1, 2, 3, 4]
    for key in ("rm/fresh_pairs", "rm/replay_pairs", "rm/acc_before", "reward_mean"):
        assert again[2][key] == pytest.approx(steps[2][key], abs=1e-5), key
    assert again[2]["rm/margin_before"] == pytest.approx(steps[2]["rm/margin_before"], abs=1e-4)
    assert (root / "v4" / "fresh_pairs.jsonl").exists()


def _steps(run: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("step", 0) >= 1 and not r.get("final")]
