"""The ``troupe`` command line.

    troupe train CONFIG.yaml [key.sub=value ...] [--address RAY_ADDRESS] [--dashboard] [--resume [CHECKPOINT]]
    troupe check CONFIG.yaml [key.sub=value ...]      validate config and data, start nothing
    troupe score INPUT.jsonl ...                       score completions offline (see --help)
    troupe rm train|pairs|serve ...                    reward models (see troupe rm --help)
    troupe eval CHECKPOINT [--n 16 --k 1,4,16 ...]     pass@k / maj@k on held-out prompts (see --help)
    troupe plot RUN_DIR                                 the run's curves as RUN_DIR/curves.png
    troupe dashboard RUN_DIR                            serve the run's live page on 127.0.0.1

Exit status: 0 on success, 2 on a bad config, override, data row or checkpoint (message names
the key, file and line), 1 on a failure during the run (message names what failed and the
checkpoint to resume from), 130/143 when stopped by SIGINT/SIGTERM (after a checkpoint when
checkpoints are on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from troupe.configs.schema import ConfigError, RunConfig, load_config


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="troupe", description="GRPO on Ray with vLLM engines and a DeepSpeed ZeRO learner.")
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("train", "run GRPO from a YAML config"), ("check", "validate a config and its data, start nothing")):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("config", help="YAML run config")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.kl_coef=0.0")
        if name == "train":
            sp.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or an embedded local cluster)")
            sp.add_argument("--dashboard", action="store_true", help="serve the run's live page (dashboard.host:port, default "
                            "http://127.0.0.1:8266) and start the Ray dashboard with the embedded local cluster")
            sp.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                            help="continue the run output_dir/name from its latest complete checkpoint, or from "
                            "the given checkpoint folder (.../resume/step_N)")
    sub.add_parser("score", help="score a JSONL of completions with reward functions", add_help=False)
    sub.add_parser("rm", help="reward models: train (Bradley-Terry), pairs (from a policy's samples), serve (HTTP)",
                   add_help=False)
    sub.add_parser("eval", help="pass@k / maj@k of a checkpoint on held-out prompts (see troupe eval --help)",
                   add_help=False)
    sub.add_parser("plot", help="write a run folder's curves as a PNG", add_help=False)
    sub.add_parser("dashboard", help="serve a run folder's live page (curves and step timeline)", add_help=False)
    args = p.parse_args(argv)
    resume = getattr(args, "resume", None)
    if resume not in (None, "latest") and "=" in resume and not Path(resume).exists():
        # `--resume key=value`: argparse gave the override to --resume's optional value
        args.overrides.append(resume)
        args.resume = "latest"
    return args


def _load(args) -> tuple[RunConfig, list[dict], list[dict]]:
    from troupe.cluster.prepare import load_task

    cfg = load_config(args.config, args.overrides)
    from troupe.cluster.jobs import check_output_dir

    check_output_dir(cfg.output_dir, cfg.checkpoint.dir)  # in a `ray job submit` driver: not in the temporary copy
    train_rows, eval_rows = load_task(cfg)
    return cfg, train_rows, eval_rows


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``troupe`` script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "score":
        from troupe.cluster.score_cli import main as score_main

        return score_main(argv[1:])
    if argv and argv[0] == "rm":
        from troupe.cluster.rm_cli import main as rm_main

        return rm_main(argv[1:])
    if argv and argv[0] == "eval":
        from troupe.cluster.eval_cli import main as eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "plot":
        from troupe.cluster.plots import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "dashboard":
        from troupe.cluster.dashboard import main as dashboard_main

        return dashboard_main(argv[1:])
    args = _parse(argv)
    from troupe.configs.pipeline import is_pipeline
    from troupe.rollout.data import DataError

    if is_pipeline(args.config):
        return _pipeline_main(args)

    try:
        cfg, train_rows, eval_rows = _load(args)
    except (ConfigError, DataError, ValueError) as e:
        print(f"troupe: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        from troupe.cluster.models import check_model
        from troupe.cluster.resources import print_report
        from troupe.reward.scoring import check_reward_config

        print_report(cfg, getattr(args, "address", None))

        try:
            check_reward_config(cfg.reward)
            model = check_model(cfg.model.path)
        except ValueError as e:
            print(f"troupe: {args.config}: {e}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(train_rows)} training rows, {len(eval_rows)} held-out rows; model {model})")
        return 0
    from troupe.cluster.runs import resume_point

    try:
        resume = resume_point(cfg, args.resume) if args.resume else None
    except ConfigError as e:
        print(f"troupe: {e}", file=sys.stderr)
        return 2
    try:
        return run_train(cfg, train_rows, eval_rows, args.address, args.dashboard, resume=resume, config_path=args.config)
    except KeyboardInterrupt:  # before the training loop (e.g. during SFT): everything was stopped on the way out
        print("troupe: stopped", file=sys.stderr)
        return 130


def _pipeline_main(args) -> int:
    """``troupe train|check PIPELINE.yaml``: a file with ``stages:`` (``troupe.cluster.pipeline``)."""
    from troupe.configs.pipeline import load_pipeline
    from troupe.rollout.data import DataError

    try:
        pipe = load_pipeline(args.config, args.overrides)
        rows = _check_pipeline(pipe)
    except (ConfigError, DataError, ValueError) as e:
        print(f"troupe: {e}", file=sys.stderr)
        return 2
    if args.cmd == "check":
        kinds = ", ".join(f"{s.name} ({s.kind})" for s in pipe.stages)
        print(f"{args.config}: ok (pipeline of {len(pipe.stages)} stages: {kinds}; {rows[0]} training rows, "
              f"{rows[1]} held-out rows)")
        return 0
    if args.resume not in (None, "latest"):
        print("troupe: --resume of a pipeline takes no path: it continues output_dir/name at its first stage "
              "that is not done", file=sys.stderr)
        return 2
    from troupe.cluster.pipeline import run_pipeline
    from troupe.cluster.runs import run_logger, sigterm_as_interrupt

    pipe.folder.mkdir(parents=True, exist_ok=True)
    say = run_logger(pipe.folder).info
    with sigterm_as_interrupt():
        return run_pipeline(pipe, args.address, resume=args.resume is not None, say=say)


def _check_pipeline(pipe) -> tuple[int, int]:
    """Check what can be checked before a pipeline starts: every policy stage's data and reward functions
    (reward-model folders an earlier stage writes are not there yet). Returns the first policy stage's
    (training rows, held-out rows). Raises ConfigError / DataError / ValueError naming the stage."""
    from troupe.cluster.prepare import load_task
    from troupe.reward.scoring import check_reward_config

    inside = str(pipe.folder.resolve())
    counts = (0, 0)
    for stage in pipe.stages:
        if stage.kind == "rm_train":
            continue
        cfg = stage.config
        try:
            train_rows, eval_rows = load_task(cfg)
            later = [m for m in cfg.reward.models if str(Path(m.path).resolve()).startswith(inside)]
            known = cfg.reward.model_copy(update={"models": [m for m in cfg.reward.models if m not in later]})
            if known.functions or known.models:
                check_reward_config(known)
        except (ConfigError, ValueError) as e:
            raise type(e)(f"{pipe.source}: {stage.label}: {e}") from None
        if counts == (0, 0):
            counts = (len(train_rows), len(eval_rows))
    return counts


def run_train(cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], address: str | None,
              dashboard: bool = False, *, resume=None, config_path: str = "CONFIG") -> int:
    """``troupe.cluster.runs.train`` with its exceptions turned into the exit statuses of the module docstring
    (the run's log already says what happened and how to resume)."""
    from troupe.cluster.runs import RunFailed, RunStopped, train

    try:
        train(cfg, train_rows, eval_rows, address=address, dashboard=dashboard, resume=resume, config_path=config_path)
    except ConfigError as e:
        print(f"troupe: {e}", file=sys.stderr)
        return 2
    except RunFailed:
        return 1
    except RunStopped as e:
        return 128 + e.signum
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
