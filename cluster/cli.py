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
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

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
        from troupe.reward.scoring import check_reward_config

        try:
            check_reward_config(cfg.reward)
            model = check_model(cfg.model.path)
        except ValueError as e:
            print(f"troupe: {args.config}: {e}", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(train_rows)} training rows, {len(eval_rows)} held-out rows; model {model})")
        return 0
    try:
        resume = _resume_point(cfg, args.resume) if args.resume else None
    except ConfigError as e:
        print(f"troupe: {e}", file=sys.stderr)
        return 2
    try:
        return run_train(cfg, train_rows, eval_rows, args.address, args.dashboard, resume=resume, config_path=args.config)
    except KeyboardInterrupt:  # before the training loop (e.g. during SFT): everything was stopped on the way out
        print("troupe: stopped", file=sys.stderr)
        return 130


def _eval_kind(cfg: RunConfig) -> str:
    return "greedy" if cfg.eval.n == 1 else f"{cfg.eval.n} samples at T={cfg.eval.temperature:g}"


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

    pipe.folder.mkdir(parents=True, exist_ok=True)
    say = _run_logger(pipe.folder).info
    import signal

    old_term = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        return run_pipeline(pipe, args.address, resume=args.resume is not None, say=say)
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


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


class ResumePoint(NamedTuple):
    """Where ``--resume`` continues: the checkpoint folder, the run directory, the checkpoint's driver
    state, and the config keys that changed since (all allowed)."""

    path: Path
    run_dir: Path
    state: dict
    changes: list[str]


def _resume_point(cfg: RunConfig, arg: str) -> ResumePoint:
    """The ``ResumePoint`` of ``--resume [arg]``; ConfigError if unusable."""
    from troupe.cluster import checkpoint

    if arg == "latest":
        run_dir = Path(cfg.output_dir) / cfg.name
        root = checkpoint.checkpoint_root(cfg, run_dir)
        path = checkpoint.latest(root)
        if path is None:
            raise ConfigError(f"--resume: no complete checkpoint under {root} (checkpoints are written when "
                              "checkpoint.every > 0)")
    else:
        path = Path(arg).resolve()
    state = checkpoint.load_state(path)
    changes = checkpoint.check_compatible(path, cfg)
    return ResumePoint(path, Path(state["run_dir"]), state, changes)


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


def _interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_train(cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], address: str | None,
              dashboard: bool = False, *, resume: ResumePoint | None = None,
              config_path: str = "CONFIG") -> int:
    """Start Ray, build/SFT the model (or take it from the checkpoint), start the actors, train, save.

    Returns the exit status. Whatever happens, the actors, the placement group and an embedded
    Ray cluster are stopped before it returns (SIGTERM is turned into the same clean stop as Ctrl-C).
    """
    import signal

    from troupe.cluster.metrics import make_run_dir

    t0 = time.time()
    if resume is not None:
        run_dir = resume.run_dir
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = make_run_dir(cfg.output_dir, cfg.name)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    say = _run_logger(run_dir).info
    say(f"run directory {run_dir}")
    old_term = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None

    import ray

    from troupe.cluster.runtime import init_ray

    page = None
    if dashboard:  # troupe's live page of this run (cluster/dashboard.py); a busy port does not stop the run
        from troupe.cluster.dashboard import serve

        try:
            page = serve(run_dir, cfg.dashboard.host, cfg.dashboard.port)
            say(f"dashboard: {page.url} (the Ray dashboard: http://127.0.0.1:8265 with the embedded cluster)")
        except RuntimeError as e:
            say(f"warning: dashboard not started: {e}")
    try:
        try:
            init_ray(cfg, address, dashboard)  # first: a cluster problem fails before minutes of SFT
        except ConnectionError as e:
            say(f"cannot join the Ray cluster: {e}")
            return 1
        return _train_on_ray(cfg, train_rows, eval_rows, run_dir, resume, config_path, say, t0)
    finally:
        ray.shutdown()
        if page is not None:
            page.stop()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _train_on_ray(cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], run_dir: Path,
                  resume: ResumePoint | None, config_path: str, say, t0: float, model_path: str | None = None) -> int:
    """GRPO on a joined Ray cluster: the model (prepared, resumed, or ``model_path`` as given: a pipeline's
    previous stage), the actors, ``train``; summary.json in ``run_dir``. Returns the exit status."""
    from transformers import AutoTokenizer

    from troupe.cluster import checkpoint
    from troupe.cluster.prepare import prepare_model
    from troupe.cluster.runtime import start_actors
    from troupe.cluster.train import RunStopped, train
    from troupe.rollout.prompts import build_prompts, prompt_stream

    timings, info = {}, {}
    if resume is not None:
        model_path = resume.state["model_path"]
        say(f"resuming from {resume.path}; policy initialised from {model_path}; config changes since: "
            + (", ".join(resume.changes) or "none"))
    elif model_path is None:
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
    t1 = time.time()
    try:
        actors = start_actors(cfg, model_path, log=say)
    except (RuntimeError, TimeoutError) as e:  # an actor died or hung while starting (ActorFailed, RemoteTimeout)
        say(f"actors failed to start: {e}")
        return 1
    timings["actor_start_seconds"] = time.time() - t1
    say(f"{cfg.rollout.num_engines} engine(s), {cfg.learner.num_ranks} learner rank(s) (ZeRO-{cfg.learner.zero_stage}), "
        f"{cfg.reward.num_workers if cfg.reward.functions else 0} reward worker(s)"
        + "".join(f", {m.num_workers} reward-model actor(s) ({m.name})" for m in cfg.reward.models)
        + f" ready in {timings['actor_start_seconds']:.0f} s")
    try:
        summary = train(cfg, run_dir, actors, eval_prompts, tok.pad_token_id or 0, prompt_stream(prompts, cfg.seed), say,
                        model_path=model_path, resume=resume.path if resume else None)
    except RunStopped as e:
        say(f"{e}" + (f"; resume with: troupe train {config_path} --resume" if e.checkpoint else ""))
        return 128 + e.signum
    except KeyboardInterrupt:
        say("stopped at once by a second signal (no checkpoint written for the current step)")
        return 130
    except Exception as e:  # a dead rank, a hang, too many engine failures or non-finite steps: name it, point at the checkpoint
        last = checkpoint.latest(checkpoint.checkpoint_root(cfg, run_dir))
        # the fault paths raise RuntimeError / TimeoutError subclasses with a full message; anything else
        # is unexpected and keeps its traceback
        logging.getLogger("troupe").error(f"run failed: {e}", exc_info=not isinstance(e, (RuntimeError, TimeoutError)))
        say(f"last complete checkpoint: {last}; resume with: troupe train {config_path} --resume" if last
            else "no checkpoint to resume from (set checkpoint.every to write them)")
        return 1
    finally:
        actors.shutdown()
    summary.update(info, **timings, wall_seconds=time.time() - t0, run_dir=str(run_dir))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    from troupe.cluster.train import eval_summary

    if cfg.plots:
        from troupe.cluster.plots import plot_run

        try:
            say(f"curves: {plot_run(run_dir)}")
        except (OSError, ValueError) as e:  # a plot never fails a finished run
            say(f"warning: no curves.png ({e})")

    say(f"done in {summary['wall_seconds']:.0f} s; checkpoint {summary['checkpoint']}")
    say(f"held-out {_eval_kind(cfg)} start: {eval_summary(summary['eval_start'])}")
    say(f"held-out {_eval_kind(cfg)} final: {eval_summary(summary['eval_final'])}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
