"""The GRPO training loop (DeepSeekMath arXiv 2402.03300, Algorithm 1), over Ray actors.

    for each step:
        sample a batch of prompts; engines draw G responses each (policy version v)
        reward workers score the groups while later chunks are still generating
        [dynamic sampling: drop zero-variance groups, refill from more prompts]
        learner ranks compute old (and reference) log-probs of their shard
        driver: reward shaping (overlong, KL-in-reward) -> group-relative advantages
        learner ranks: clipped-surrogate update(s) with KL to the reference in the loss
        every sync.every steps: weights -> engines as version v+1; check engine/learner logprobs agree

The maths is in ``troupe.learner.grpo``; the actors in ``troupe.cluster.runtime``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import ray
import torch
from tqdm import tqdm

from troupe.cluster.metrics import MetricsWriter, mean_dicts, rollout_metrics
from troupe.cluster.runtime import Actors
from troupe.cluster.weight_sync import WeightSync
from troupe.configs.schema import RunConfig
from troupe.learner import grpo
from troupe.learner.batch import TrainBatch, collate_groups
from troupe.rollout.dispatch import RolloutDispatcher
from troupe.rollout.types import Group, Prompt

log = logging.getLogger("troupe")

# max |engine - learner| log-prob (nats) on a fixed sequence after a weight sync; above it the
# loop warns. float32 measured ~1e-6, bfloat16 0.019 (tests/test_engine_slow.py).
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def collect_groups(dispatcher: RolloutDispatcher, stream: Iterator[Prompt], cfg: RunConfig) -> tuple[list[Group], dict]:
    """One step's scored groups; with dynamic sampling (DAPO) zero-variance groups are replaced."""
    ro, need = cfg.rollout, cfg.rollout.prompts_per_step
    sample = dict(n=ro.group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                  step_delimiter=cfg.reward.step_delimiter if cfg.algo.advantage == "process" else None)
    groups, timing = dispatcher.run([next(stream) for _ in range(need)], **sample)
    info = {"time/generate": timing["generate"], "time/reward": timing["reward"]}
    if not cfg.algo.dynamic_sampling:
        return groups, info
    def informative(g: Group) -> bool:
        if cfg.algo.advantage == "process":
            return grpo.process_group_informative(g.step_rewards)
        return bool(grpo.dynamic_sampling_keep(_rewards(g), ro.group_size)[0])
    kept, dropped, rounds = [g for g in groups if informative(g)], [g for g in groups if not informative(g)], 0
    while len(kept) < need and rounds < cfg.algo.max_refill_rounds:
        rounds += 1
        more, t = dispatcher.run([next(stream) for _ in range(need - len(kept))], **sample)
        info["time/generate"] += t["generate"]
        info["time/reward"] += t["reward"]
        kept += [g for g in more if informative(g)]
        dropped += [g for g in more if not informative(g)]
    info.update({"dynamic/refill_rounds": rounds, "dynamic/informative_groups": min(len(kept), need)})
    return (kept + dropped)[:need], info  # short of informative groups: pad with zero-advantage ones


def _rewards(g: Group) -> torch.Tensor:
    return torch.tensor([float("nan") if r is None else r for r in g.rewards], dtype=torch.float32)


def minibatch_denoms(batch: TrainBatch, num_ranks: int, mini_batches: int) -> list[dict]:
    """Global loss denominators per mini-batch: valid tokens and valid sequences over all ranks."""
    per_rank = batch.size // num_ranks
    rows = per_rank // mini_batches
    mask = batch.response_mask.view(num_ranks, mini_batches, rows, -1)
    return [{"num_tokens": max(1.0, float(mask[:, m].sum())), "num_seqs": max(1.0, float((mask[:, m].sum(-1) > 0).sum()))}
            for m in range(mini_batches)]


def advantages(batch: TrainBatch, prep: list[dict], cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward shaping, then advantages by ``algo.advantage``: ([B, T] advantages, [B] shaped rewards).

    ``prep`` is the learner ranks' ``prepare`` output (old/ref logprobs, for KL in the reward).
    Per-sequence terms (DAPO overlong penalty, KL in the reward) are added to the outcome reward,
    or to the last step's reward under process supervision.
    """
    a, G = cfg.algo, cfg.rollout.group_size
    shaping = torch.zeros(batch.size)  # [B]
    lengths = batch.attention_mask[:, batch.prompt_len:].sum(1).float()  # [B] response tokens, masked or not
    if a.overlong_buffer:
        shaping = shaping + grpo.overlong_penalty(lengths, cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
    if a.kl_coef > 0 and a.kl_in == "reward":
        old = torch.cat([p["old_logprobs"] for p in prep])
        ref = torch.cat([p["ref_logprobs"] for p in prep])
        shaping = grpo.reward_kl_penalty(shaping, old, ref, batch.response_mask, a.kl_coef, a.kl_estimator)
    rewards = batch.rewards + shaping
    if a.advantage != "process":
        return grpo.compute_advantages(a.advantage, rewards, G, batch.response_mask, std=a.std, eps=a.adv_eps), rewards
    if batch.step_rewards is None:
        raise RuntimeError("algo.advantage 'process' but the scored groups carry no step rewards "
                           "(no reward function of kind 'process' ran)")
    step_rewards = grpo.add_to_last_step(batch.step_rewards, shaping)
    adv = grpo.process_advantages(step_rewards, batch.step_ends, G, batch.response_len, std=a.std, eps=a.adv_eps)
    return adv * batch.response_mask, rewards


def learn(actors: Actors, batch: TrainBatch, cfg: RunConfig) -> dict:
    """Advantages and the learner update for one batch; returns learner + advantage metrics."""
    a, R, G = cfg.algo, cfg.learner.num_ranks, cfg.rollout.group_size
    rows = batch.size // R
    tensors_only = batch.with_(step_rewards=None, step_ends=None)  # the ranks need no step lists
    shards = [tensors_only.select(slice(r * rows, (r + 1) * rows)) for r in range(R)]
    prep = ray.get([lr.prepare.remote(s) for lr, s in zip(actors.learners, shards)])
    adv, rewards = advantages(batch, prep, cfg)
    denoms = minibatch_denoms(batch, R, a.mini_batches)
    out = mean_dicts(ray.get([lr.update.remote(adv[r * rows:(r + 1) * rows], denoms) for r, lr in enumerate(actors.learners)]))
    valid = batch.response_mask.sum(1) > 0
    seq_adv = adv.sum(1) / batch.response_mask.sum(1).clamp(min=1)
    if valid.sum() > 1:
        out["adv/mean"], out["adv/std"] = float(seq_adv[valid].mean()), float(seq_adv[valid].std())
    out.update(grpo.group_stats(rewards, G))
    if a.advantage == "process":  # zero variance means: no step reward differs within the group
        per_group = [batch.step_rewards[k:k + G] for k in range(0, batch.size, G)]
        out["zero_variance_frac"] = sum(not grpo.process_group_informative(g) for g in per_group) / len(per_group)
        counts = [len(rs) for rs in batch.step_rewards if rs]
        out["process/steps_mean"] = sum(counts) / max(1, len(counts))  # steps per scored sample
    return out


def check_sync(actors: Actors, token_ids: list[int], start: int) -> float:
    """Max |engine - learner| log-prob over ``token_ids[start:]`` for every engine (nats)."""
    # every rank runs the forward: under ZeRO-3 gathering the parameters is collective
    learner_lp = ray.get([lr.sequence_logprobs.remote(token_ids, start) for lr in actors.learners])[0]
    engine_lps = ray.get([e.sequence_logprobs.remote(token_ids, start) for e in actors.engines])
    return max(max(abs(x - y) for x, y in zip(learner_lp, lp)) for lp in engine_lps)


def evaluate(dispatcher: RolloutDispatcher, prompts: list[Prompt], cfg: RunConfig, dump: Path | None = None) -> dict:
    """Greedy (temperature 0) accuracy and reward on held-out prompts through the engines.

    With ``dump``, every prompt's completion and scores are written there as JSONL.
    """
    groups, t = dispatcher.run(prompts, n=1, max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0)
    if dump is not None:
        with open(dump, "w") as f:
            for g in groups:
                f.write(json.dumps({"question": g.prompt.question, "answer": g.prompt.answer, "completion": g.samples[0].text,
                                    "reward": g.rewards[0], "parts": {k: v[0] for k, v in g.reward_parts.items()}}) + "\n")
    return {**rollout_metrics(groups, prefix="eval/"), "eval/seconds": t["generate"] + t["reward"]}


def train(cfg: RunConfig, run_dir: Path, actors: Actors, prompts: list[Prompt], eval_prompts: list[Prompt],
          pad_id: int, stream: Iterator[Prompt], say: Callable[[str], None] = print) -> dict:
    """Run ``cfg.steps`` GRPO steps; returns the summary (eval before/after, last metrics)."""
    dispatcher = RolloutDispatcher(actors.engines, actors.rewards)
    sync = WeightSync(actors.learners, actors.engines, cfg.sync.strategy, actors.single_node())
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)
    first = evaluate(dispatcher, eval_prompts, cfg, run_dir / "eval_start.jsonl")
    writer.write({"step": 0, **first})
    say(f"start: held-out greedy accuracy {first.get('eval/accuracy', float('nan')):.3f} on {len(eval_prompts)} prompts")
    version, record = 0, {}
    bar = tqdm(range(1, cfg.steps + 1), desc="grpo", dynamic_ncols=True)
    for step in bar:
        t_step = time.time()
        groups, record = collect_groups(dispatcher, stream, cfg)
        record.update(rollout_metrics(groups))
        batch = collate_groups(groups, pad_id, mask_truncated=cfg.algo.mask_truncated)
        t0 = time.time()
        record.update(learn(actors, batch, cfg))
        record["time/learn"] = time.time() - t0
        if record.get("zero_variance_frac") == 1.0:
            say(grpo.ZERO_VARIANCE_MESSAGE)
        if step % cfg.sync.every == 0 or step == cfg.steps:
            version = step
            record.update(sync.sync(version))
            record["time/sync"] = record["sync_seconds"]
            probe = groups[0].prompt.token_ids + groups[0].samples[0].response_ids
            record["sync/logprob_max_diff"] = check_sync(actors, probe, len(groups[0].prompt.token_ids))
            if record["sync/logprob_max_diff"] > SYNC_TOLERANCE[cfg.model.dtype]:
                say(f"warning: after weight sync v{version} engines and learner disagree by "
                    f"{record['sync/logprob_max_diff']:.3g} nats on a fixed sequence "
                    f"(tolerance {SYNC_TOLERANCE[cfg.model.dtype]} for {cfg.model.dtype})")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            record.update(evaluate(dispatcher, eval_prompts, cfg))
        if cfg.save_every and step % cfg.save_every == 0:
            ray.get([lr.save_hf.remote(str(run_dir / "checkpoints" / f"step_{step}"), str(run_dir / "tokenizer")) for lr in actors.learners])
        record.update(step=step, policy_version=version, **{"time/step": time.time() - t_step})
        writer.write(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record.get('accuracy', float('nan')):.3f}",
                        kl=f"{record.get('kl_ref', 0.0):.4f}", v=version)
    final = evaluate(dispatcher, eval_prompts, cfg, run_dir / "eval_final.jsonl")
    writer.write({"step": cfg.steps, "final": True, **final})
    ckpt = str(run_dir / "checkpoints" / "final")
    ray.get([lr.save_hf.remote(ckpt, str(run_dir / "tokenizer")) for lr in actors.learners])
    sync.close()
    writer.close()
    return {"eval_start": first, "eval_final": final, "last_step": record, "checkpoint": ckpt, "policy_version": version}
