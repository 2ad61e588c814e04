"""``troupe rm pairs``: preference pairs from a policy's own samples, ranked by a run's reward functions.

    troupe rm pairs RUN_CONFIG.yaml [key.sub=value ...] --model MODEL_DIR --out PAIRS.jsonl
        [--prompts N] [--n G] [--pairs-per-prompt K] [--split train|eval] [--temperature T]
        [--address RAY_ADDRESS]

The run config gives the data, the prompt format, the engines (``rollout``) and the reward
functions (``reward``); ``--model`` the policy to sample (an HF folder with its tokenizer, e.g. a
run's ``checkpoints/final``; default ``model.path`` unless that is ``builtin:``). For each of the
first ``--prompts`` rows of the split (default all; rows are in ``load_task``'s order, prompts built
by ``troupe.rollout.prompts.build_prompts`` exactly as a run builds them, those longer than
``data.max_prompt_tokens`` dropped) the engines draw ``--n`` samples (default
``rollout.group_size``) at ``--temperature`` (default ``rollout.temperature``), with the seed
``sampling_seeds(seed, 0, [i])`` for the i-th prompt, so the same command writes the same file.
The run's reward lanes (``troupe.reward.router.RewardRouter``: the rule functions and any
``reward.models``, as in a run) score them with the run's combined reward.

Pairs (DeepSeekMath's "verifier-correct chosen, incorrect rejected, same prompt"): within a group,
among the samples that have a reward (not None) and a non-blank text, chosen is drawn from the
samples with the highest reward and rejected from those with the lowest, when highest > lowest;
up to ``--pairs-per-prompt`` pairs (default 1) with distinct (chosen, rejected) texts, picked by a
RNG seeded with (seed, prompt index). A group whose samples all score the same gives no pair.

Each output line: ``{"prompt": the templated prompt text the policy saw, "chosen", "rejected",
"chosen_reward", "rejected_reward", "question", "answer", "uid"}``; it loads with
``troupe.rollout.preferences.load_pairs`` (standard format) for ``troupe rm train``. The file is
written under a temporary name and renamed when complete.

Exit status: 0 on success; 2 on a bad config, override, option, data row, model folder or reward
spec (the message names it); 1 when the Ray cluster cannot be joined, an engine fails to start, or
sampling fails (more engine deaths than ``cluster.max_engine_failures``, a call hanging past
``cluster.rpc_timeout_s``); 130 on Ctrl-C or SIGTERM (no file written). Ray actors, the placement
group and an embedded Ray cluster are always stopped before it returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["choose_pairs", "group_pairs", "main"]

PROG = "troupe rm pairs"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with our prefix
        self.print_usage(sys.stderr)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = _Parser(prog=PROG, description="Preference pairs from a policy's own samples: per prompt, a sample with the "
                "highest reward (chosen) against one with the lowest (rejected).")
    p.add_argument("config", help="YAML run config (data, prompt format, rollout, reward)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.max_new_tokens=256")
    p.add_argument("--model", default=None, help="policy folder to sample (HF format with tokenizer); default "
                   "model.path when it is not builtin:")
    p.add_argument("--out", required=True, help="output JSONL of pairs")
    p.add_argument("--prompts", type=int, default=None, help="sample the first N prompts of the split (default all)")
    p.add_argument("--n", type=int, default=None, help="samples per prompt (default rollout.group_size)")
    p.add_argument("--pairs-per-prompt", type=int, default=1, help="at most K pairs per prompt (default 1)")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="training or held-out rows")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default rollout.temperature)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: cluster.address, RAY_ADDRESS or "
                   "an embedded local cluster)")
    args = p.parse_intermixed_args(argv)
    for name, low in (("prompts", 1), ("n", 2), ("pairs_per_prompt", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if args.temperature is not None and not (0 < args.temperature <= 10):
        p.error(f"--temperature must be in (0, 10] (a pair needs samples that differ), got {args.temperature}")
    return args


def choose_pairs(texts: Sequence[str], rewards: Sequence[Optional[float]], k: int,
                 rng: random.Random) -> list[tuple[int, int]]:
    """Up to ``k`` (chosen, rejected) sample indices of one group (module docstring: the rule).

    Samples with a None or non-finite reward, or a blank text, take no part. Candidates are every
    (highest-reward, lowest-reward) combination with distinct texts, one per distinct text pair,
    in index order; ``rng.sample`` picks ``min(k, candidates)`` of them. [] when fewer than two
    samples take part or they all score the same.
    """
    scored = [(i, float(r)) for i, r in enumerate(rewards)
              if r is not None and math.isfinite(r) and texts[i].strip()]
    if len(scored) < 2:
        return []
    high, low = max(r for _, r in scored), min(r for _, r in scored)
    if not high > low:
        return []
    candidates: dict[tuple[str, str], tuple[int, int]] = {}
    for c in (i for i, r in scored if r == high):
        for w in (i for i, r in scored if r == low):
            if texts[c] != texts[w]:
                candidates.setdefault((texts[c], texts[w]), (c, w))
    pool = list(candidates.values())
    return rng.sample(pool, min(k, len(pool)))


def _pair_rng(seed: int, position: int) -> random.Random:
    return random.Random(f"{seed}:rm-pairs:{position}")  # str seeds hash with sha512: the same in every process


def _prepare(args: argparse.Namespace) -> tuple[Any, str, list, int]:
    """(config, model folder, prompts, prompts dropped for length), everything checked before Ray starts
    (reward specs too); raises ConfigError / DataError / ValueError / OSError."""
    from troupe.cluster.prepare import load_task
    from troupe.cluster.sampling import policy_prompts
    from troupe.configs.schema import ConfigError, load_config

    cfg = load_config(args.config, args.overrides)
    model = args.model or cfg.model.path
    if model.startswith("builtin:"):
        raise ConfigError(f"--model is needed: model.path is {model!r}, which is built by a run (give the run's "
                          "checkpoints/final or checkpoints/sft folder)")
    if not Path(model).is_dir():
        raise ConfigError(f"--model {model}: no such model folder")
    model = str(Path(model).resolve())
    from troupe.reward.scoring import check_reward_config

    check_reward_config(cfg.reward)  # what the reward lanes check, before Ray starts
    train_rows, eval_rows = load_task(cfg)
    rows = train_rows if args.split == "train" else eval_rows
    if args.prompts is not None:
        rows = rows[:args.prompts]
    if not rows:
        raise ValueError(f"the {args.split} split has no rows")
    prompts, dropped = policy_prompts(cfg, model, rows, "--model")
    return cfg, model, prompts, dropped


def main(argv: list[str] | None = None) -> int:
    """``troupe rm pairs ...``; returns the exit status (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parse(argv)
    from troupe.configs.schema import ConfigError
    from troupe.rollout.data import DataError

    try:
        cfg, model, prompts, dropped = _prepare(args)
    except (ConfigError, DataError, ValueError, OSError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    from troupe.cluster.runs import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            return _run(args, cfg, model, prompts, dropped)
    except KeyboardInterrupt:
        print(f"{PROG}: stopped; {args.out} not written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, cfg: Any, model: str, prompts: list, dropped: int) -> int:
    """Start Ray, the reward pool and the engines, sample and write the pairs, stop everything."""
    import ray
    from tqdm import tqdm

    from troupe.cluster.runtime import init_ray
    from troupe.cluster.sampling import PolicySampler

    t0 = time.time()
    sampler = PolicySampler(cfg, model)
    try:
        try:
            init_ray(cfg, args.address)
        except ConnectionError as e:
            print(f"{PROG}: cannot join the Ray cluster: {e}", file=sys.stderr)
            return 1
        try:
            sampler.start_rewards()  # as a run's; before the engines: a bad spec fails in seconds
        except ValueError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        try:
            sampler.start_engines(log=tqdm.write)
        except (RuntimeError, TimeoutError) as e:  # ActorFailed, RemoteTimeout
            print(f"{PROG}: engines failed to start: {e}", file=sys.stderr)
            return 1
        print(f"{PROG}: {len(sampler.engines)} engine(s) on {model} ready in {time.time() - t0:.0f} s", flush=True)
        try:
            stats = _sample(args, cfg, sampler, prompts)
        except (RuntimeError, TimeoutError) as e:  # ActorFailed, RemoteTimeout, too many engine failures
            print(f"{PROG}: sampling failed: {e}; {args.out} not written", file=sys.stderr)
            return 1
    finally:
        sampler.stop()
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
    scored = stats["scored"]
    print(f"{PROG}: {len(prompts)} prompts x {stats['n']} samples from the {args.split} split"
          + (f" ({dropped} dropped as longer than data.max_prompt_tokens)" if dropped else "")
          + f"; {stats['groups_with_pair']} groups with a pair ({stats['tied']} all-equal groups); "
          f"{stats['pairs']} pairs written to {args.out}; mean reward "
          + (f"{stats['reward_sum'] / scored:.4f} over {scored} scored samples" if scored else "n/a (no sample scored)")
          + f"; {time.time() - t0:.0f} s")
    return 0


def _sample(args: argparse.Namespace, cfg: Any, sampler: Any, prompts: list) -> dict:
    """Sample every prompt in chunks of ``rollout.prompts_per_step``, write the pairs; counts."""
    from tqdm import tqdm

    from troupe.cluster.sampling import policy_sampling

    n = args.n or cfg.rollout.group_size
    sampling = policy_sampling(cfg, n, args.temperature)
    stats = {"n": n, "pairs": 0, "groups_with_pair": 0, "tied": 0, "scored": 0, "reward_sum": 0.0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f, tqdm(total=len(prompts), desc="rm pairs", unit="prompt",
                                                        dynamic_ncols=True) as bar:
            for positions, groups in sampler.chunks(prompts, sampling):
                for pos, g in zip(positions, groups):
                    _write_group(f, g, pos, args.pairs_per_prompt, cfg.seed, stats)
                bar.update(len(groups))
                bar.set_postfix(pairs=stats["pairs"])
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def group_pairs(group: Any, position: int, k: int, seed: int) -> list[dict]:
    """The pair lines (module docstring: format) of one scored ``troupe.core.types.Group``, the
    ``position``-th prompt sampled: :func:`choose_pairs` with the RNG of (seed, position)."""
    texts = [s.text for s in group.samples]
    p = group.prompt
    return [{"prompt": p.text, "chosen": texts[c], "rejected": texts[r],
             "chosen_reward": float(group.rewards[c]), "rejected_reward": float(group.rewards[r]),
             "question": p.question, "answer": p.answer, "uid": p.uid}
            for c, r in choose_pairs(texts, group.rewards, k, _pair_rng(seed, position))]


def _write_group(f: Any, g: Any, position: int, k: int, seed: int, stats: dict) -> None:
    valid = [r for r in g.rewards if r is not None and math.isfinite(r)]
    stats["scored"] += len(valid)
    stats["reward_sum"] += sum(valid)
    if len(valid) >= 2 and max(valid) == min(valid):
        stats["tied"] += 1
    lines = group_pairs(g, position, k, seed)
    stats["groups_with_pair"] += bool(lines)
    stats["pairs"] += len(lines)
    for line in lines:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
