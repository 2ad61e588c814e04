"""``troupe rm train CONFIG.yaml``: a Bradley-Terry reward model on DeepSpeed ZeRO ranks (Ray actors).

The loop reads as the recipe: load pairs (``troupe.rollout.preferences``; bad rows name
file:line), split off held-out pairs, start ``learner.num_ranks`` ``RewardModelRank`` actors in one
placement group, then per epoch: shuffle (seeded), one optimizer step per ``train.batch_size``
pairs (the last partial batch of an epoch is dropped; the next epoch reshuffles, so no pair is
always left out), held-out pairwise accuracy and margin; at the end the reward mean/std over the
training texts (for ``normalize``) and the reward-model folder ``<run dir>/model``.

Files in ``<output_dir>/<name>``: ``config.yaml``, ``metrics.jsonl`` (one line per step and one
per evaluation), ``log.txt``, ``summary.json``, ``model/`` (HF AutoModelForSequenceClassification,
num_labels=1, tokenizer, ``reward_stats.json``).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from troupe.configs.schema import RewardModelTrainConfig, dump_config

__all__ = ["train_reward_model"]

MAX_STATS_TEXTS = 4096
"""Training texts whose rewards give the stored mean/std (chosen and rejected of the first pairs)."""


def scored_pair_texts(pairs: Sequence[Any], tokenizer: Any) -> list[tuple[str, str, Optional[float]]]:
    """(chosen text, rejected text, margin) per pair: ``reward_text(prompt, response, eos)``."""
    from troupe.reward.model import reward_text
    from troupe.rollout.preferences import pair_texts

    eos = tokenizer.eos_token
    out = []
    for p in pairs:
        prompt, chosen, rejected = pair_texts(p, tokenizer)
        out.append((reward_text(prompt, chosen, eos), reward_text(prompt, rejected, eos), p.margin))
    return out


def _rewards(group: Any, texts: list[str]) -> list[float]:
    """Raw rewards of ``texts`` across ranks: equal shares (padded with the first text), rank order."""
    world = len(group)
    per = max(1, math.ceil(len(texts) / world))
    padded = texts + [texts[0]] * (per * world - len(texts))
    shares = [padded[r * per:(r + 1) * per] for r in range(world)]
    refs = [h.rewards.remote(s) for h, s in zip(group.handles, shares)]
    from troupe.core.rpc import wait_all

    out = wait_all(refs, [f"reward-model rank {r}" for r in range(world)], "rewards", group.rpc_timeout_s)
    return [x for share in out for x in share][:len(texts)]


def reward_stats(group: Any, texts: list[str]) -> dict:
    """{"mean", "std" (sample), "count"} of the raw rewards of ``texts``: the ``reward_stats.json`` that
    ``normalize`` reads (``troupe.reward.model.STATS_FILE``)."""
    r = _rewards(group, texts)
    mean = sum(r) / len(r)
    return {"mean": mean, "std": math.sqrt(sum((x - mean) ** 2 for x in r) / max(len(r) - 1, 1)), "count": len(r)}


def evaluate_pairs(group: Any, pairs: list[tuple[str, str, Optional[float]]]) -> dict:
    """Held-out pairwise accuracy (r_c > r_r), mean margin r_c - r_r and mean BT loss (margins included)."""
    if not pairs:
        return {}
    r = _rewards(group, [c for c, _, _ in pairs] + [rj for _, rj, _ in pairs])
    n = len(pairs)
    diffs = [r[i] - r[n + i] for i in range(n)]
    losses = [math.log1p(math.exp(-(d - (m or 0.0)))) if d - (m or 0.0) > -30 else -(d - (m or 0.0))
              for d, (_, _, m) in zip(diffs, pairs)]
    return {"eval/accuracy": sum(d > 0 for d in diffs) / n, "eval/margin": sum(diffs) / n,
            "eval/loss": sum(losses) / n, "eval/pairs": n}


def _model_path(cfg: RewardModelTrainConfig, run_dir: Path, pairs: list[tuple[str, str, Optional[float]]],
                log: Callable[[str], None]) -> str:
    if not cfg.model.path.startswith("builtin:"):
        if not (Path(cfg.model.path) / "config.json").exists():
            raise ValueError(f"model.path: {cfg.model.path!r} is not a model folder (no config.json there; "
                             f"working directory {Path.cwd()})")
        return cfg.model.path
    from troupe.learner.tiny_model import build_tiny_model

    m = cfg.model
    corpus = [t for c, r, _ in pairs[:5000] for t in (c, r)]
    path = build_tiny_model(str(run_dir / "model_init"), corpus, hidden_size=m.hidden_size, num_layers=m.num_layers,
                            num_heads=m.num_heads, num_kv_heads=max(1, m.num_heads // 2),
                            intermediate_size=m.intermediate_size,
                            max_position_embeddings=max(512, cfg.train.max_length), seed=cfg.seed)
    log(f"built {cfg.model.path} at {path}")
    return path


def _pair_data(cfg: RewardModelTrainConfig, run_dir: Path, log: Callable[[str], None]) -> tuple[str, list, list]:
    """The starting model folder and the (chosen, rejected, margin) texts of the training and held-out pairs.
    Raises DataError: a bad pair (file:line) or fewer training pairs than a batch."""
    from transformers import AutoTokenizer

    from troupe.rollout.data import DataError
    from troupe.rollout.preferences import load_pairs, split_pairs

    d = cfg.data
    fields = dict(prompt_field=d.prompt_field, chosen_field=d.chosen_field, rejected_field=d.rejected_field,
                  margin_field=d.margin_field)
    pairs = load_pairs(d.path, max_rows=d.max_rows, **fields)
    if d.eval_path:
        train_pairs, held_pairs = pairs, load_pairs(d.eval_path, **fields)
    else:
        try:
            train_pairs, held_pairs = split_pairs(pairs, d.num_eval, cfg.seed)
        except ValueError as e:
            raise DataError(f"{d.path}: {e}") from None
    if len(train_pairs) < cfg.train.batch_size:
        raise DataError(f"{d.path}: {len(train_pairs)} training pairs, fewer than train.batch_size = "
                        f"{cfg.train.batch_size}")
    plain = [(str(p.prompt) + str(p.chosen), str(p.prompt) + str(p.rejected), None) for p in train_pairs[:5000]]
    model_path = _model_path(cfg, run_dir, plain, log)
    tok = AutoTokenizer.from_pretrained(model_path)
    train, held = scored_pair_texts(train_pairs, tok), scored_pair_texts(held_pairs, tok)
    log(f"pairs: {len(train)} train, {len(held)} held out ({d.path})")
    return model_path, train, held


def _epoch(group: Any, train: list, order: list[int], batch_size: int, step: int,
           record: Callable[[dict], None]) -> tuple[int, dict]:
    """One pass over ``train`` in ``order``, ``batch_size`` pairs a step on every rank; returns the last step
    number and the pass's mean loss and accuracy ("train/loss", "train/accuracy")."""
    sums, steps = {"loss": 0.0, "accuracy": 0.0}, len(order) // batch_size
    for s in range(steps):
        batch = [train[i] for i in order[s * batch_size:(s + 1) * batch_size]]
        per_rank = group.call("train_step", batch)
        step += 1
        met = {"loss": sum(m["loss"] for m in per_rank),
               **{k: sum(m[k] for m in per_rank) / len(per_rank) for k in ("accuracy", "margin", "learn_seconds")},
               "grad_norm": per_rank[0]["grad_norm"], "lr": per_rank[0]["lr"]}
        record({"step": step, **met})
        sums["loss"] += met["loss"]
        sums["accuracy"] += met["accuracy"]
    return step, {f"train/{k}": v / max(steps, 1) for k, v in sums.items()}


def _eval_line(ev: dict) -> str:
    return (f"held-out accuracy {ev.get('eval/accuracy', float('nan')):.3f}, "
            f"margin {ev.get('eval/margin', float('nan')):.3f}")


def train_reward_model(cfg: RewardModelTrainConfig, address: Optional[str] = None,
                       log: Callable[[str], None] = print) -> dict:
    """Train, evaluate and save a Bradley-Terry reward model; returns the summary (also summary.json).

    Raises:
        troupe.rollout.data.DataError: a bad pair (file:line) or too few pairs.
        troupe.core.rpc.ActorFailed / RemoteTimeout: a rank died or hung (names it).
    """
    from ray.util.placement_group import remove_placement_group

    from troupe.cluster.runtime import join_ray, start_zero_ranks
    from troupe.learner.rm_rank import RewardModelRank

    t_start = time.time()
    run_dir = Path(cfg.output_dir).resolve() / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    model_path, train, held = _pair_data(cfg, run_dir, log)
    join_ray(address or cfg.cluster.address, cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank)
    group, pg = None, None
    metrics_file = open(run_dir / "metrics.jsonl", "w")

    def record(rec: dict) -> None:
        metrics_file.write(json.dumps(rec) + "\n")
        metrics_file.flush()

    try:
        group, pg = start_zero_ranks(RewardModelRank, cfg.learner, cfg.device, cfg.cluster.rpc_timeout_s,
                                     model_path, cfg)
        ev = evaluate_pairs(group, held)
        record({"epoch": 0, "step": 0, **ev})
        history = [{"epoch": 0, **ev}]
        log(f"epoch 0: {_eval_line(ev)}")
        rng, step = random.Random(cfg.seed), 0
        for epoch in range(1, cfg.train.epochs + 1):
            order = list(range(len(train)))
            rng.shuffle(order)
            t0, first = time.time(), step
            step, means = _epoch(group, train, order, cfg.train.batch_size, step, lambda r: record({"epoch": epoch, **r}))
            ev = evaluate_pairs(group, held)
            record({"epoch": epoch, "step": step, **ev})
            history.append({"epoch": epoch, **means, **ev})
            log(f"epoch {epoch}: train loss {means['train/loss']:.4f}, train accuracy {means['train/accuracy']:.3f}; "
                f"{_eval_line(ev)} ({time.time() - t0:.0f} s, {step - first} steps)")
        stats = reward_stats(group, [t for c, r, _ in train[:MAX_STATS_TEXTS // 2] for t in (c, r)])
        out = str(run_dir / "model")
        group.call("save_hf", out, model_path, stats)
        log(f"reward model written to {out} (training rewards: mean {stats['mean']:.3f}, std {stats['std']:.3f})")
    finally:
        metrics_file.close()
        if group is not None:
            group.shutdown()
        if pg is not None:
            remove_placement_group(pg)
    summary = {"model": out, "train_pairs": len(train), "held_out_pairs": len(held), "steps": step,
               "epochs": history, "reward_stats": stats, "seconds": time.time() - t_start,
               "config": str(run_dir / "config.yaml")}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
