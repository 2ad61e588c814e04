"""A GRPO run as a library call: start it from Python or a notebook and catch what failed.

    from troupe.cluster.prepare import load_task
    from troupe.cluster.runs import RunFailed, train
    from troupe.configs.schema import load_config

    cfg = load_config("configs/arith_cpu.yaml", ["steps=5"])
    try:
        summary = train(cfg, *load_task(cfg))          # summary.json's contents
    except RunFailed as e:
        print(e, e.checkpoint)                         # what died, the checkpoint to resume from

What a call raises (``troupe.cluster.cli`` is the one place that turns these into exit statuses):

============================  ==========================================================  ====
``ConfigError``                a config, override, checkpoint or prompt set that cannot     2
                               run (``troupe.configs.schema``; data errors are
                               ``DataError`` / ``ValueError`` from ``load_task``)
``RunFailed``                  an actor died or hung, too many engine failures, non-finite  1
                               steps, a cluster that cannot be joined; ``.checkpoint``
``RunStopped``                 SIGINT/SIGTERM: stopped after a complete step (and its        128 + signum
                               checkpoint); ``.signum``, ``.checkpoint``
``KeyboardInterrupt``          a second signal: stopped at once                             130
============================  ==========================================================  ====

Whatever happens, the actors, the placement group and an embedded Ray cluster are stopped before
the call returns or raises. The run's log (``run_dir/log.txt`` and stdout, the "troupe" logger) says
the same as the exception, with the command that resumes the run.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

from troupe.cluster.train import RunStopped
from troupe.configs.schema import ConfigError, RunConfig, dump_config

__all__ = ["ResumePoint", "RunFailed", "RunStopped", "resume_point", "run_logger", "sigterm_as_interrupt", "train",
           "train_on_ray"]


class RunFailed(RuntimeError):
    """A run failed while it ran (exit status 1 on the command line).

    Attributes:
        checkpoint: the last complete checkpoint folder (``.../resume/step_N``), or None.
        run_dir: the run folder.
    """

    def __init__(self, message: str, run_dir: Path, checkpoint: Optional[Path] = None) -> None:
        super().__init__(message)
        self.run_dir, self.checkpoint = run_dir, checkpoint


class ResumePoint(NamedTuple):
    """Where ``--resume`` continues: the checkpoint folder, the run directory, the checkpoint's driver
    state, and the config keys that changed since (all allowed)."""

    path: Path
    run_dir: Path
    state: dict
    changes: list[str]


def resume_point(cfg: RunConfig, arg: str = "latest") -> ResumePoint:
    """The ``ResumePoint`` of ``--resume [arg]``: "latest" (the run folder ``output_dir/name``'s newest complete
    checkpoint) or a checkpoint folder. Raises ConfigError if there is none or it does not fit ``cfg``."""
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


def run_logger(run_dir: Path) -> logging.Logger:
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


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM raises KeyboardInterrupt as Ctrl-C does (so ``finally`` blocks stop the actors);
    in the main thread only (elsewhere Python cannot set handlers, and nothing changes)."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def train(cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], *, address: Optional[str] = None,
          dashboard: bool = False, resume: Optional[ResumePoint] = None, config_path: str = "CONFIG") -> dict:
    """A whole GRPO run: join or start Ray, build/SFT the model (or take it from ``resume``), start the
    actors, train, save; returns the run summary (``run_dir/summary.json``).

    Args:
        cfg: the run config; ``train_rows`` / ``eval_rows``: its data (``troupe.cluster.prepare.load_task``).
        address: a Ray cluster to join (None: RAY_ADDRESS or an embedded local cluster).
        dashboard: serve the run's live page (``cfg.dashboard``).
        resume: continue from this checkpoint (``resume_point``).
        config_path: the config file as the user named it, for the resume command in messages.
    Raises:
        See the module docstring. SIGTERM is turned into the same clean stop as Ctrl-C while it runs.
    """
    import ray

    from troupe.cluster.metrics import make_run_dir
    from troupe.cluster.runtime import init_ray

    t0 = time.time()
    if resume is not None:
        run_dir = resume.run_dir
        os.makedirs(run_dir, exist_ok=True)
    else:
        run_dir = make_run_dir(cfg.output_dir, cfg.name)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    say = run_logger(run_dir).info
    say(f"run directory {run_dir}")
    page = None
    if dashboard:  # troupe's live page of this run (cluster/dashboard.py); a busy port does not stop the run
        from troupe.cluster.dashboard import serve

        try:
            page = serve(run_dir, cfg.dashboard.host, cfg.dashboard.port)
            say(f"dashboard: {page.url} (the Ray dashboard: http://127.0.0.1:8265 with the embedded cluster)")
        except RuntimeError as e:
            say(f"warning: dashboard not started: {e}")
    try:
        with sigterm_as_interrupt():
            try:
                init_ray(cfg, address, dashboard)  # first: a cluster problem fails before minutes of SFT
            except ConnectionError as e:
                say(f"cannot join the Ray cluster: {e}")
                raise RunFailed(f"cannot join the Ray cluster: {e}", run_dir) from e
            return train_on_ray(cfg, train_rows, eval_rows, run_dir, resume=resume, config_path=config_path, t0=t0)
    finally:
        ray.shutdown()
        if page is not None:
            page.stop()


def _prompts(cfg: RunConfig, tok, train_rows: list[dict], eval_rows: list[dict]) -> tuple[list, list]:
    """Training and held-out prompts; ConfigError when no training prompt fits ``data.max_prompt_tokens``."""
    from troupe.rollout.prompts import build_prompts

    d = cfg.data
    kw = dict(template=d.template, prompt_format=d.prompt_format, system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens)
    prompts, dropped = build_prompts(train_rows, tok, **kw)
    eval_prompts, _ = build_prompts(eval_rows, tok, **kw)
    if not prompts:
        raise ConfigError(f"no training prompt fits data.max_prompt_tokens = {d.max_prompt_tokens}")
    logging.getLogger("troupe").info(f"{len(prompts)} training prompts ({dropped} dropped as longer than "
                                     f"{d.max_prompt_tokens} tokens), {len(eval_prompts)} held-out")
    return prompts, eval_prompts


def train_on_ray(cfg: RunConfig, train_rows: list[dict], eval_rows: list[dict], run_dir: Path, *,
                 resume: Optional[ResumePoint] = None, config_path: str = "CONFIG", t0: Optional[float] = None,
                 model_path: Optional[str] = None) -> dict:
    """GRPO on a joined Ray cluster: the model (prepared, resumed, or ``model_path`` as given: a pipeline's
    previous stage), the actors, ``troupe.cluster.train.train``; writes and returns summary.json of ``run_dir``.
    Raises as ``train`` does (ConfigError, RunFailed, RunStopped, KeyboardInterrupt); the actors are stopped."""
    from transformers import AutoTokenizer

    from troupe.cluster import checkpoint
    from troupe.cluster.prepare import prepare_model
    from troupe.cluster.runtime import start_actors
    from troupe.cluster.train import train as train_loop
    from troupe.rollout.prompts import prompt_stream

    log = logging.getLogger("troupe")
    say = log.info
    t0 = time.time() if t0 is None else t0
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
    prompts, eval_prompts = _prompts(cfg, tok, train_rows, eval_rows)
    t1 = time.time()
    try:
        actors = start_actors(cfg, model_path, log=say)
    except (RuntimeError, TimeoutError) as e:  # an actor died or hung while starting (ActorFailed, RemoteTimeout)
        say(f"actors failed to start: {e}")
        raise RunFailed(f"actors failed to start: {e}", run_dir) from e
    timings["actor_start_seconds"] = time.time() - t1
    critic = f"{cfg.critic.num_ranks} critic rank(s) (ZeRO-{cfg.critic.zero_stage}), " if cfg.critic else ""
    say(f"{cfg.rollout.num_engines} engine(s), {cfg.learner.num_ranks} learner rank(s) (ZeRO-{cfg.learner.zero_stage}), "
        f"{critic}{cfg.reward.num_workers if cfg.reward.functions else 0} reward worker(s)"
        + "".join(f", {m.num_workers} reward-model actor(s) ({m.name})" for m in cfg.reward.models)
        + f" ready in {timings['actor_start_seconds']:.0f} s")
    try:
        summary = train_loop(cfg, run_dir, actors, eval_prompts, tok.pad_token_id or 0, prompt_stream(prompts, cfg.seed),
                             model_path=model_path, resume=resume.path if resume else None)
    except RunStopped as e:
        say(f"{e}" + (f"; resume with: troupe train {config_path} --resume" if e.checkpoint else ""))
        raise
    except KeyboardInterrupt:
        say("stopped at once by a second signal (no checkpoint written for the current step)")
        raise
    except Exception as e:  # a dead rank, a hang, too many engine failures or non-finite steps: name it, point at the checkpoint
        last = checkpoint.latest(checkpoint.checkpoint_root(cfg, run_dir))
        # the fault paths raise RuntimeError / TimeoutError subclasses with a full message; anything else
        # is unexpected and keeps its traceback
        log.error(f"run failed: {e}", exc_info=not isinstance(e, (RuntimeError, TimeoutError)))
        say(f"last complete checkpoint: {last}; resume with: troupe train {config_path} --resume" if last
            else "no checkpoint to resume from (set checkpoint.every to write them)")
        raise RunFailed(f"run failed: {e}", run_dir, last) from e
    finally:
        actors.shutdown()
    summary.update(info, **timings, wall_seconds=time.time() - t0, run_dir=str(run_dir))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _report(cfg, run_dir, summary)
    return summary


def _report(cfg: RunConfig, run_dir: Path, summary: dict) -> None:
    """The end of a finished run's log: its curves (never failing the run), time, checkpoint, held-out numbers."""
    from troupe.cluster.train import eval_summary

    say = logging.getLogger("troupe").info
    if cfg.plots:
        from troupe.cluster.plots import plot_run

        try:
            say(f"curves: {plot_run(run_dir)}")
        except (OSError, ValueError) as e:  # a plot never fails a finished run
            say(f"warning: no curves.png ({e})")
    kind = "greedy" if cfg.eval.n == 1 else f"{cfg.eval.n} samples at T={cfg.eval.temperature:g}"
    say(f"done in {summary['wall_seconds']:.0f} s; checkpoint {summary['checkpoint']}")
    say(f"held-out {kind} start: {eval_summary(summary['eval_start'])}")
    say(f"held-out {kind} final: {eval_summary(summary['eval_final'])}")
