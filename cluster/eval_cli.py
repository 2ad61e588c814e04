"""``troupe eval CHECKPOINT``: pass@k, maj@k, accuracy, reward and length of a policy on held-out prompts.

    troupe eval runs/arith/checkpoints/final --n 16 --k 1,4,16
    troupe eval CHECKPOINT --config CONFIG.yaml --data test.jsonl --n 8 --k 1,8 [key.sub=value ...]

The run config (``--config``, default: the ``config.yaml`` of the run folder the checkpoint sits
in) gives the reward functions, the prompt template, ``rollout.max_new_tokens`` and the engine
settings; ``--data`` (JSONL or Parquet, the config's ``data.prompt_field``/``answer_field``)
replaces the config's held-out rows. Generation runs on vLLM engines (Ray actors, an embedded
local cluster unless ``--address``), scoring on the config's reward workers
(:func:`troupe.cluster.pipeline.evaluate_policy`); the metrics are
:func:`troupe.reward.passk.eval_metrics`'s. Every sample goes to ``--out`` (JSONL, default
``<checkpoint>/eval_n{N}.jsonl``) and the metrics to the same path with ``.summary.json``.

Exit status: 0, 2 on a bad argument/config/data file (message names it), 1 on a failure while
running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

PROG = "troupe eval"


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k {text!r}: comma-separated integers, e.g. 1,4,16") from None
    if not ks:
        raise argparse.ArgumentTypeError("--k: at least one k")
    return ks


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="pass@k / maj@k evaluation of a checkpoint on vLLM engines.")
    p.add_argument("checkpoint", help="an HF model folder (e.g. runs/NAME/checkpoints/final)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.max_new_tokens=64")
    p.add_argument("--config", default=None, help="run config (default: config.yaml of the checkpoint's run folder)")
    p.add_argument("--data", default=None, help="held-out rows, JSONL or Parquet (default: the config's held-out rows)")
    p.add_argument("--n", type=int, default=16, help="samples per prompt (default 16; 1 = greedy)")
    p.add_argument("--k", type=_ks, default=None, help="pass@k / maj@k sizes, comma-separated (default 1,n)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: eval.temperature)")
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many prompts")
    p.add_argument("--out", default=None, help="JSONL of every sample (default <checkpoint>/eval_n{N}.jsonl)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: an embedded local cluster)")
    return p.parse_args(argv)


def find_run_config(checkpoint: Path) -> Optional[Path]:
    """The ``config.yaml`` of the run folder holding ``checkpoint`` (the checkpoint folder or up to 3 parents)."""
    for d in [checkpoint, *list(checkpoint.resolve().parents)[:3]]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


class _Usage(Exception):
    """A bad checkpoint, config or data set: the message is printed and ``troupe eval`` exits 2."""


def _load(args) -> tuple[Path, Path, Any, list[dict], list[int]]:
    """(checkpoint, config file, run config with the eval overrides, held-out rows, k values); _Usage if unusable."""
    from troupe.configs.schema import ConfigError, load_config
    from troupe.rollout.data import DataError, load_rows

    ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").is_file():
        raise _Usage(f"{ckpt} is not a model folder (no config.json)")
    config = Path(args.config) if args.config else find_run_config(ckpt)
    if config is None:
        raise _Usage(f"no config.yaml next to {ckpt}; give the run config with --config")
    ks = args.k or sorted({1, args.n})
    over = [*args.overrides, f"eval.n={args.n}", f"eval.k=[{','.join(map(str, ks))}]"]
    if args.temperature is not None:
        over.append(f"eval.temperature={args.temperature}")
    try:
        cfg = load_config(str(config), over)
        if args.data:
            d = cfg.data
            rows = load_rows(args.data, "parquet" if args.data.endswith(".parquet") else "jsonl",
                             prompt_field=d.prompt_field, answer_field=d.answer_field, max_rows=args.limit)
        else:
            from troupe.cluster.prepare import load_task

            rows = load_task(cfg)[1]
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        raise _Usage(str(e)) from None
    rows = rows[:args.limit] if args.limit else rows
    if not rows:
        raise _Usage("no held-out rows to evaluate")
    return ckpt, config, cfg, rows, ks


def main(argv: list[str]) -> int:
    """Entry point of ``troupe eval``; returns the exit status."""
    args = _parse(argv)
    try:
        ckpt, config, cfg, rows, ks = _load(args)
    except _Usage as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else ckpt / f"eval_n{args.n}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)

    from troupe.cluster.pipeline import evaluate_policy
    from troupe.cluster.runtime import init_ray

    def say(msg: str) -> None:
        print(f"{PROG}: {msg}", flush=True)

    import ray

    t0 = time.time()
    joined = not ray.is_initialized()  # a caller's Ray session is left running
    try:
        init_ray(cfg, args.address)
        say(f"{len(rows)} prompts x {args.n} samples of {ckpt} (config {config})")
        metrics = evaluate_policy(cfg, str(ckpt), rows, out, say)
    except Exception as e:  # noqa: BLE001 - a dead engine or reward worker: named, exit 1
        print(f"{PROG}: failed: {e}", file=sys.stderr)
        return 1
    finally:
        if joined and ray.is_initialized():
            ray.shutdown()
    metrics["eval/wall_seconds"] = time.time() - t0
    summary = out.with_suffix(".summary.json")
    summary.write_text(json.dumps({"checkpoint": str(ckpt), "config": str(config), "data": args.data,
                                   "prompts": len(rows), "n": args.n, "k": ks, "metrics": metrics}, indent=2))
    print(format_table(metrics, ks))
    say(f"samples: {out}; metrics: {summary}")
    return 0


def format_table(metrics: dict, ks: list[int]) -> str:
    """The metrics as an aligned two-column table (metric, value)."""
    rows = [(f"pass@{k}", metrics.get(f"eval/pass@{k}")) for k in ks] + \
           [(f"maj@{k}", metrics.get(f"eval/maj@{k}")) for k in ks if k > 1] + \
           [("accuracy (per sample)", metrics.get("eval/accuracy")), ("mean reward", metrics.get("eval/reward_mean")),
            ("mean length (tokens)", metrics.get("eval/response_len_mean"))]
    rows += [(k[len("eval/"):], v) for k, v in metrics.items() if k.startswith("eval/reward/") and k.endswith("_mean")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {'n/a' if v is None else f'{v:.4f}'}" for name, v in rows)
