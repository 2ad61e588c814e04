"""End-to-end runs on the real stack: local Ray, vLLM CPU engines, DeepSpeed ZeRO over gloo.

Marked slow; `make test` runs them in a separate step after the fast tests. Every run goes
through ``troupe.cluster.cli.main`` exactly as a user's `troupe train` does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from troupe.cluster.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # every test here starts a local Ray cluster

REPO = Path(__file__).resolve().parents[1]
# a graded reward next to accuracy and format so that groups have variance even before the
# tiny model solves anything (then every step has a non-zero policy gradient)
LENGTH = f"{REPO / 'tests' / 'e2e_rewards.py'}:length_reward"
ARITH_STEPS = "troupe.demo.arith:arith_steps"  # the demo's process reward; metric keys use this spec
REWARDS = f"reward.functions=[{{name: accuracy}}, {{name: format, weight: 0.1}}, {{name: '{LENGTH}', weight: 0.01}}]"

# small and quick: 4 prompts x G=4 = 16 samples per step, 16 held-out prompts
TINY = [
    "sft.steps=30", "sft.num_examples=256", "data.options.num_train=512", "data.num_eval=16",
    "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
    "learner.micro_batch_size=4", "learner.num_ranks=2", "learner.num_cpus_per_rank=0.5",
    "rollout.num_cpus_per_engine=1", "learner.lr=0.001",
]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, name: str, extra: list[str], config: str = "configs/arith_cpu.yaml") -> tuple[Path, dict]:
    rc = main(["train", str(REPO / config), f"output_dir={tmp_path}", f"name={name}", *extra])
    assert rc == 0
    run_dir = tmp_path / name
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_arith_grpo_two_ranks(tmp_path, stage):
    """1 engine, 1 reward worker, 2 learner ranks under ZeRO-`stage`: the policy moves, engines follow."""
    # ZeRO-3 also evaluates with 4 samples per held-out prompt (pass@k / maj@k in-loop)
    sampled_eval = ["eval.n=4", "eval.k=[1,4]"] if stage == 3 else []
    run_dir, summary = _run(tmp_path, f"zero{stage}", TINY + [REWARDS, "steps=3", f"learner.zero_stage={stage}", "algo.kl_coef=0.01",
                                                            # ZeRO-2 syncs through /dev/shm, ZeRO-3 through the object store
                                                            f"sync.strategy={'shm' if stage == 2 else 'object_store'}"]
                            + sampled_eval)
    recs = _records(run_dir)
    steps = [r for r in recs if r.get("step", 0) >= 1 and not r.get("final")]
    assert [r["step"] for r in steps] == [1, 2, 3]
    # the engines received every new version
    assert [r["policy_version"] for r in steps] == [1, 2, 3]
    assert summary["policy_version"] == 3
    assert all(r["sync_strategy"] == ("shm" if stage == 2 else "object_store") for r in steps)
    assert all("staleness/mean" not in r for r in steps)  # the synchronous loop: every group on-policy
    # the policy changed: the learner's update was non-zero and moved what the engines sample
    assert all(r["grad_norm"] > 0 for r in steps)
    assert any(abs(r["approx_kl_old"]) > 0 or r["kl_ref"] > 0 for r in steps[1:])
    # engine and learner agree on a fixed sequence after each sync (fp32: well under 1e-3 nats)
    assert all(r["sync/logprob_max_diff"] < 1e-3 for r in steps)
    for key in ("reward_mean", "reward/accuracy_mean", "reward/format_mean", "response_len_mean", "clip_frac_low",
                "clip_frac_high", "logprob_mismatch", "time/generate", "time/reward", "time/learn", "time/sync",
                "time/generate/engine_0", "time/learn/rank_0", "time/learn/rank_1"):
        assert key in steps[-1], key
    assert (run_dir / "config.yaml").exists()
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))  # curves for `tensorboard --logdir`
    # each run logs into its own directory; the held-out line says how it sampled (greedy, or n samples at T)
    assert ("held-out 4 samples at T=1 final: reward" if stage == 3 else "held-out greedy final: reward") \
        in (run_dir / "log.txt").read_text()
    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plots: true by default
    final_eval = summary["eval_final"]
    for key in ("eval/reward_mean", "eval/accuracy", "eval/reward/accuracy_mean", "eval/reward/format_mean"):
        assert key in final_eval, key
    if stage == 3:  # 16 held-out prompts x 4 samples: pass@4 >= pass@1 = per-sample accuracy
        assert final_eval["eval/samples_per_prompt"] == 4
        assert final_eval["eval/pass@4"] >= final_eval["eval/pass@1"] == pytest.approx(final_eval["eval/accuracy"])
        assert 0.0 <= final_eval["eval/maj@4"] <= final_eval["eval/pass@4"]
        assert len((run_dir / "eval_final.jsonl").read_text().splitlines()) == 16 * 4
    else:  # `troupe eval` on the final checkpoint: its run folder's config, 8 prompts x 4 samples
        out = tmp_path / "eval" / "samples.jsonl"
        assert main(["eval", str(ckpt), "--n", "4", "--k", "1,2,4", "--limit", "8", "--out", str(out)]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert len(rows) == 32 and {r["sample"] for r in rows} == {0, 1, 2, 3}
        met = json.loads(out.with_suffix(".summary.json").read_text())["metrics"]
        # the metrics are those of the written samples: per-sample accuracy and pass@1 from the dump by hand
        correct = [r["parts"]["accuracy"] >= 1.0 for r in rows]
        assert met["eval/accuracy"] == pytest.approx(sum(correct) / 32) == pytest.approx(met["eval/pass@1"])
        assert met["eval/pass@1"] <= met["eval/pass@2"] <= met["eval/pass@4"]
    from safetensors.torch import load_file

    sft = load_file(str(run_dir / "checkpoints" / "sft" / "model.safetensors"))
    final = load_file(str(ckpt / "model.safetensors"))
    assert any(not (sft[k] == final[k]).all() for k in sft), "GRPO did not change the policy"


def test_gsm8k_three_steps(tmp_path):
    """The real-data path: GSM8K train file, GSM8K answer reward, 3 GRPO steps."""
    run_dir, summary = _run(tmp_path, "gsm8k", ["data.num_eval=8", "rollout.max_new_tokens=16"], "configs/gsm8k_cpu.yaml")
    steps = [r for r in _records(run_dir) if r.get("step", 0) >= 1 and not r.get("final")]
    assert len(steps) == 3
    assert "reward/gsm8k_mean" in steps[0] and steps[0]["num_samples"] == 32
    assert (Path(summary["checkpoint"]) / "config.json").exists()


VARIANTS = [
    {"advantage": {"name": "grpo", "std": "population"}},
    {"advantage": "dr_grpo", "loss_agg": "seq_mean_token_sum_norm"},
    {"advantage": "rloo"},
    {"advantage": "reinforce_pp_baseline"},
    {"advantage": {"name": "online_rft", "correct_at": 0.0}, "loss_agg": "seq_mean_token_mean"},  # every sample kept
    # on-policy distillation from the run's initial model (the student has moved by then), GRPO mixed in
    {"advantage": {"name": "distill", "teacher": "INITIAL_MODEL", "reward_weight": 0.5}},
    {"loss_agg": "seq_mean_token_mean"},
    {"policy_loss": "gspo"},  # GSPO with the paper's clip range 3e-4 / 4e-4
    {"policy_loss": {"name": "ppo_clip", "dual_clip": 3.0}, "kl_estimator": "k1"},
    {"kl_in": "reward", "kl_estimator": "k2"},
    {"kl_coef": 0.0, "tis_cap": None},
    {"dynamic_sampling": True, "max_refill_rounds": 1, "overlong_buffer": 8},
    {"ppo_epochs": 2, "mini_batches": 2},
]


def test_every_variant_trains_end_to_end(tmp_path):
    """One engine + two ZeRO-2 ranks started once; one real GRPO step + weight sync per variant."""
    import math

    import ray
    from transformers import AutoTokenizer

    from troupe.cluster.prepare import load_task, prepare_model
    from troupe.cluster.runtime import init_ray, start_actors
    from troupe.cluster.train import collect_groups
    from troupe.cluster.weight_sync import WeightSync
    from troupe.configs.schema import AlgoConfig, load_config
    from troupe.learner.batch import collate_groups
    from troupe.rollout.prompts import build_prompts, prompt_stream

    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", TINY + ["algo.kl_coef=0.01", "sft.enabled=false", REWARDS])
    train_rows, _ = load_task(cfg)
    model_path, _ = prepare_model(cfg, tmp_path, train_rows, print)
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts, _ = build_prompts(train_rows[:64], tok, template="raw", prompt_format=cfg.data.prompt_format,
                               system_prompt=None, max_prompt_tokens=64)
    init_ray(cfg, None)
    actors = start_actors(cfg, model_path)
    try:
        sync = WeightSync(actors.learners, actors.engines, "auto", actors.single_node())
        stream = prompt_stream(prompts, 0)
        for version, variant in enumerate(VARIANTS, start=1):
            if isinstance(variant.get("advantage"), dict) and variant["advantage"].get("teacher") == "INITIAL_MODEL":
                variant = {**variant, "advantage": {**variant["advantage"], "teacher": model_path}}
            algo = AlgoConfig(**{**cfg.algo.model_dump(), **variant})
            vcfg = cfg.model_copy(update={"algo": algo})
            actors.learners.set_algo(algo)
            groups, info = collect_groups(actors, stream, vcfg, version)
            batch = collate_groups(groups, tok.pad_token_id, mask_truncated=algo.mask_truncated)
            m = actors.learners.train_step(batch)
            assert math.isfinite(m["loss"]) and m["grad_norm"] > 0, (variant, m)
            assert m["zero_variance_frac"] < 1.0, variant
            if variant.get("dynamic_sampling"):
                assert "dynamic/refill_rounds" in info
            if algo.advantage.uses_teacher:  # loaded by set_algo in every rank; the student has moved away from it
                assert m["distill/reverse_kl"] != 0.0
            assert sync.sync(version)["policy_version"] == version
        assert actors.engines.versions() == [len(VARIANTS)]
        sync.close()
    finally:
        actors.shutdown()
        ray.shutdown()


def test_process_supervision_end_to_end(tmp_path):
    """algo.advantage 'process' from YAML: the demo's arith_steps process verifier scores each column sum,
    engines mark step ends, the learner trains on per-token process advantages (2 steps, 2 ranks)."""
    # the graded length reward (an outcome function, added to the last step) keeps every group
    # informative while the tiny model still gets most column sums wrong
    rewards = f"reward.functions=[{{name: '{ARITH_STEPS}', kind: process}}, {{name: '{LENGTH}', weight: 0.01}}]"
    # with DAPO dynamic sampling on step rewards and a k2 KL in the reward (on the last step)
    extra = ["algo.dynamic_sampling=true", "algo.kl_coef=0.01", "algo.kl_in=reward", "algo.kl_estimator=k2"]
    run_dir, summary = _run(tmp_path, "process", TINY + ["steps=2", "sft.steps=120", rewards, *extra], "configs/arith_process_cpu.yaml")
    steps = [r for r in _records(run_dir) if r.get("step", 0) >= 1 and not r.get("final")]
    assert [r["step"] for r in steps] == [1, 2] and summary["policy_version"] == 2
    for r in steps:
        # the cold-started model writes column sums separated by ",": several steps per sample
        assert r["process/steps_mean"] > 1.5, r["process/steps_mean"]
        assert f"reward/{ARITH_STEPS}_mean" in r and r["zero_variance_frac"] < 1.0
        assert r["grad_norm"] > 0 and math.isfinite(r["loss"])
        assert r["sync/logprob_max_diff"] < 1e-3
        assert "dynamic/refill_rounds" in r
    assert any(r["kl_ref"] > 0 for r in steps)  # the reference model was loaded and measured
    assert ARITH_STEPS in (run_dir / "eval_final.jsonl").read_text().splitlines()[0]
