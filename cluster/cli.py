"""The ``troupe`` command line.

    troupe train CONFIG.yaml [key.sub=value ...] [--address RAY_ADDRESS] [--dashboard]
    troupe check CONFIG.yaml [key.sub=value ...]      validate config and data, start nothing
    troupe score INPUT.jsonl ...                       score completions offline (see --help)

Exit status: 0 on success, 2 on a bad config, override or data row (message names the key,
file and line), 1 on a failure during the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from troupe.configs.schema import ConfigError, RunConfig, dump_config, load_config


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="troupe", description="GRPO on Ray with vLLM engines and a DeepSpeed ZeRO learner.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("train", "run GRPO from a YAML config"), ("check", "validate a config and its data, start nothing")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML run config")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.kl_coef=0.0")
        if name == "train":
            sp.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or an embedded local cluster)")
            sp.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with the embedded local cluster")
    sub.add_parser("score", help="score a JSONL of completions with reward functions", add_help=False)
    return p.parse_args(argv)


def _load(args) -> tuple[RunConfig, list[dict], list[dict]]:
    from troupe.cluster.prepare import load_task

    cfg = load_config(args.config, args.overrides)
    train_rows, eval_rows = load_task(cfg)
    return cfg, train_rows, eval_rows


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``troupe`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "score":
        from troupe.cluster.score_cli import main as score_main

        return score_main(argv[1:])
    args = _parse(argv)
    from troupe.rollout.data import DataError

    try:
        cfg, train_rows, eval_rows = _load(args)
    except (ConfigError, DataError, ValueError) as e:
        print(f"troupe: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        print(f"{args.config}: ok ({len(train_rows)} training rows, {len(eval_rows)} held-out rows)")
        return 0
    return run_train(cfg, train_rows, eval_rows, args.address, args.dashboard)


def _run_logger(run_dir: Path) -> logging.Logger:
    """The "troupe" logger writing to stdout and run_dir/log.txt (handlers replaced for every run)."""
    logger = logging.getLogger("troupe")
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(name)s %(message)s")
    for h in (logging.FileHandler(run_dir / "log.txt"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def run_train(cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], address: str | None,
              dashboard: bool = False) -> int:
    """Build/SFT the model, start the actors, train, evaluate, save. Returns the exit status."""
    from troupe.cluster.metrics import make_run_dir

    t0 = time.time()
    run_dir = make_run_dir(cfg.output_dir, cfg.name)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    say = _run_logger(run_dir).info
    say(f"run directory {run_dir}")

    import ray
    from transformers import AutoTokenizer

    from troupe.cluster.prepare import prepare_model
    from troupe.cluster.runtime import init_ray, start_actors
    from troupe.cluster.train import train
    from troupe.rollout.prompts import build_prompts, prompt_stream

    timings = {}
    model_path, info = prepare_model(cfg, run_dir, train_rows, say)
    timings["prepare_seconds"] = time.time() - t0
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.save_pretrained(run_dir / "tokenizer")
    d = cfg.data
    kw = dict(template=d.template, prompt_format=d.prompt_format, system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens)
    prompts, dropped = build_prompts(train_rows, tok, **kw)
    eval_prompts, _ = build_prompts(eval_rows, tok, **kw)
    if not prompts:
        say(f"no training prompt fits data.max_prompt_tokens = {d.max_prompt_tokens}")
        return 2
    say(f"{len(prompts)} training prompts ({dropped} dropped as longer than {d.max_prompt_tokens} tokens), {len(eval_prompts)} held-out")
    init_ray(cfg, address, dashboard)
    t1 = time.time()
    actors = start_actors(cfg, model_path)
    timings["actor_start_seconds"] = time.time() - t1
    say(f"{cfg.rollout.num_engines} engine(s), {cfg.learner.num_ranks} learner rank(s) (ZeRO-{cfg.learner.zero_stage}), "
        f"{cfg.reward.num_workers} reward worker(s) ready in {timings['actor_start_seconds']:.0f} s")
    try:
        summary = train(cfg, run_dir, actors, eval_prompts, tok.pad_token_id or 0, prompt_stream(prompts, cfg.seed), say)
    finally:
        actors.shutdown()
        ray.shutdown()
    summary.update(info, **timings, wall_seconds=time.time() - t0, run_dir=str(run_dir))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    acc0, acc1 = summary["eval_start"].get("eval/accuracy"), summary["eval_final"].get("eval/accuracy")
    say(f"done in {summary['wall_seconds']:.0f} s: held-out greedy accuracy {acc0} -> {acc1}; checkpoint {summary['checkpoint']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
