"""The GRPO training loop (DeepSeekMath arXiv 2402.03300, Algorithm 1), over Ray actors.

    for each step:
        sample a batch of prompts; engines draw G responses each (policy version v)
        reward workers score the groups while later chunks are still generating
        [dynamic sampling: drop groups that are not informative, refill from more prompts]
        learner ranks: old/ref log-probs, reward shaping, advantages, clipped update (+ KL)
        every sync.every steps: weights -> engines as version v+1; check engine/learner logprobs agree

The maths is in ``troupe.learner`` (``grpo``, ``step``); the actors in ``troupe.cluster.runtime``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from troupe.cluster.metrics import MetricsWriter, rollout_metrics
from troupe.cluster.runtime import Actors
from troupe.cluster.weight_sync import WeightSync
from troupe.configs.schema import RunConfig
from troupe.core.types import Group, Prompt, Sampling
from troupe.learner import grpo
from troupe.learner.batch import collate_groups
from troupe.learner.step import group_signal, informative

log = logging.getLogger("troupe")

# max |engine - learner| log-prob (nats) on a fixed sequence after a weight sync; above it the
# loop warns. float32 measured ~1e-6, bfloat16 0.019 (tests/test_engine_slow.py).
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def sampling(cfg: RunConfig) -> Sampling:
    """The training sampling settings: G samples per prompt; step ends for step-reward estimators."""
    ro = cfg.rollout
    delimiter = cfg.reward.step_delimiter if cfg.algo.advantage.uses_step_rewards else None
    return Sampling(n=ro.group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                    step_delimiter=delimiter)


def collect_groups(actors: Actors, stream: Iterator[Prompt], cfg: RunConfig) -> tuple[list[Group], dict]:
    """One step's scored groups; with dynamic sampling (DAPO) groups that are not informative are replaced."""
    need, sp = cfg.rollout.prompts_per_step, sampling(cfg)
    groups, t = actors.engines.generate([next(stream) for _ in range(need)], sp, actors.rewards)
    info = {"time/generate": t["generate"], "time/reward": t["reward"]}
    if not cfg.algo.dynamic_sampling:
        return groups, info
    steps = cfg.algo.advantage.uses_step_rewards

    def split(gs: list[Group]) -> tuple[list[Group], list[Group]]:
        flags = [informative(group_signal(g, steps)) for g in gs]
        return [g for g, f in zip(gs, flags) if f], [g for g, f in zip(gs, flags) if not f]

    (kept, dropped), rounds = split(groups), 0
    while len(kept) < need and rounds < cfg.algo.max_refill_rounds:
        rounds += 1
        more, t = actors.engines.generate([next(stream) for _ in range(need - len(kept))], sp, actors.rewards)
        info["time/generate"] += t["generate"]
        info["time/reward"] += t["reward"]
        good, bad = split(more)
        kept, dropped = kept + good, dropped + bad
    info.update({"dynamic/refill_rounds": rounds, "dynamic/informative_groups": min(len(kept), need)})
    return (kept + dropped)[:need], info  # short of informative groups: pad with zero-advantage ones


def check_sync(actors: Actors, token_ids: list[int], start: int) -> float:
    """Max |engine - learner| log-prob over ``token_ids[start:]`` for every engine (nats)."""
    learner_lp = actors.learners.sequence_logprobs(token_ids, start)
    return max(max(abs(x - y) for x, y in zip(learner_lp, lp)) for lp in actors.engines.sequence_logprobs(token_ids, start))


def evaluate(actors: Actors, prompts: list[Prompt], cfg: RunConfig, dump: Path | None = None) -> dict:
    """Greedy (temperature 0) accuracy and reward on held-out prompts through the engines.

    With ``dump``, every prompt's completion and scores are written there as JSONL.
    """
    greedy = Sampling(n=1, max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0)
    groups, t = actors.engines.generate(prompts, greedy, actors.rewards)
    if dump is not None:
        with open(dump, "w") as f:
            for g in groups:
                f.write(json.dumps({"question": g.prompt.question, "answer": g.prompt.answer, "completion": g.samples[0].text,
                                    "reward": g.rewards[0], "parts": {k: v[0] for k, v in g.reward_parts.items()}}) + "\n")
    return {**rollout_metrics(groups, prefix="eval/"), "eval/seconds": t["generate"] + t["reward"]}


def sync_weights(actors: Actors, sync: WeightSync, version: int, probe: Group, cfg: RunConfig, say: Callable[[str], None]) -> dict:
    """Weights -> engines as ``version``, then the engine/learner log-prob check on ``probe``'s first sample."""
    out = sync.sync(version)
    out["time/sync"] = out["sync_seconds"]
    ids = probe.prompt.token_ids + probe.samples[0].response_ids
    out["sync/logprob_max_diff"] = diff = check_sync(actors, ids, len(probe.prompt.token_ids))
    if diff > SYNC_TOLERANCE[cfg.model.dtype]:
        say(f"warning: after weight sync v{version} engines and learner disagree by {diff:.3g} nats on a fixed "
            f"sequence (tolerance {SYNC_TOLERANCE[cfg.model.dtype]} for {cfg.model.dtype})")
    return out


def train(cfg: RunConfig, run_dir: Path, actors: Actors, eval_prompts: list[Prompt], pad_id: int,
          stream: Iterator[Prompt], say: Callable[[str], None] = print) -> dict:
    """Run ``cfg.steps`` GRPO steps; returns the summary (eval before/after, last metrics)."""
    sync = WeightSync(actors.learners, actors.engines, cfg.sync.strategy, actors.single_node())
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard)
    first = evaluate(actors, eval_prompts, cfg, run_dir / "eval_start.jsonl")
    writer.write({"step": 0, **first})
    say(f"start: held-out greedy accuracy {first.get('eval/accuracy', float('nan')):.3f} on {len(eval_prompts)} prompts")
    version, record = 0, {}
    bar = tqdm(range(1, cfg.steps + 1), desc="grpo", dynamic_ncols=True)
    for step in bar:
        t_step = time.time()
        groups, record = collect_groups(actors, stream, cfg)
        record.update(rollout_metrics(groups))
        batch = collate_groups(groups, pad_id, mask_truncated=cfg.algo.mask_truncated)
        t_learn = time.time()
        record.update(actors.learners.train_step(batch), **{"time/learn": time.time() - t_learn})
        if record.get("zero_variance_frac") == 1.0:
            say(grpo.ZERO_VARIANCE_MESSAGE)
        if step % cfg.sync.every == 0 or step == cfg.steps:
            version = step
            record.update(sync_weights(actors, sync, version, groups[0], cfg, say))
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            record.update(evaluate(actors, eval_prompts, cfg))
        if cfg.save_every and step % cfg.save_every == 0:
            actors.learners.save_hf(str(run_dir / "checkpoints" / f"step_{step}"), str(run_dir / "tokenizer"))
        record.update(step=step, policy_version=version, **{"time/step": time.time() - t_step})
        writer.write(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record.get('accuracy', float('nan')):.3f}",
                        kl=f"{record.get('kl_ref', 0.0):.4f}", v=version)
    final = evaluate(actors, eval_prompts, cfg, run_dir / "eval_final.jsonl")
    writer.write({"step": cfg.steps, "final": True, **final})
    ckpt = actors.learners.save_hf(str(run_dir / "checkpoints" / "final"), str(run_dir / "tokenizer"))
    sync.close()
    writer.close()
    return {"eval_start": first, "eval_final": final, "last_step": record, "checkpoint": ckpt, "policy_version": version}
