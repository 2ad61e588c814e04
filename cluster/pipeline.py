"""``troupe train PIPELINE.yaml``: the stages of a pipeline (``troupe.configs.pipeline``), one after another.

    for each stage (sft | grpo | rejection_sampling | rm_train), in order:
        done in an earlier attempt (pipeline_state.json)?  keep its outputs, skip it
        its model.path <- the policy the previous policy stage wrote (unless the stage sets one)
        run it in <pipeline folder>/<stage name>; a grpo stage resumes from its own checkpoint
        policy stages: held-out greedy accuracy of the policy it wrote
    summary.md / summary.json: one row per stage

What a stage kind does:

* ``sft``: supervised fine-tuning on the learner ranks (``troupe.cluster.sft_train``) on ``sft.path``
  (JSONL of prompt/completion) or else the data-source plugin's cold-start examples; a
  ``builtin:`` model is built first (``troupe.cluster.prepare``).
* ``grpo``: a GRPO run exactly as ``troupe train RUN.yaml`` (``troupe.cluster.runs.train_on_ray``),
  checkpoints and faults included.
* ``rejection_sampling``: DeepSeek-R1's rejection sampling (``troupe.cluster.rejection``: sample N
  per prompt, keep what passes the named filters, write ``sft_data.jsonl`` and ``pairs.jsonl``),
  then SFT on that data set on the learner ranks.
* ``rm_train``: ``troupe rm train`` (``troupe.cluster.rm_train``); writes ``<stage>/model``.

State: ``pipeline_state.json`` in the pipeline folder records each stage's status (``running``,
``done``, ``failed``), the policy or model it wrote, its evaluation and its time; it is rewritten
atomically after every change. ``--resume`` skips the done stages and restarts the first one that
is not done (a grpo stage continues from its latest checkpoint when it wrote one). A stage that
fails is named in the log and the exit message, with the command that resumes the pipeline.
Ray is joined once for the whole pipeline and stopped at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

from troupe.configs.pipeline import POLICY_KINDS, PipelineConfig, Stage, stage_dir
from troupe.configs.schema import ConfigError, RunConfig, dump_config

__all__ = ["STATE_FILE", "PipelineFailed", "evaluate_policy", "run_pipeline", "summary_table"]

STATE_FILE = "pipeline_state.json"
log = logging.getLogger("troupe")


class PipelineFailed(RuntimeError):
    """A stage failed; ``stage`` is its label (``stages[i] 'name' (kind)``)."""

    def __init__(self, stage: Stage, cause: BaseException | str) -> None:
        self.stage = stage
        super().__init__(f"{stage.label} failed: {cause}")


# ------------------------------------------------------------------ state


def read_state(folder: Path) -> dict:
    """The pipeline's state file as a dict (``{"stages": {}}`` when there is none)."""
    path = Path(folder) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {"stages": {}}


def _write_state(folder: Path, state: dict) -> None:
    tmp = Path(folder) / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str) + "\n")
    os.replace(tmp, Path(folder) / STATE_FILE)


# ------------------------------------------------------------------ evaluation


def evaluate_policy(cfg: RunConfig, model_path: str, eval_rows: list[dict], dump: Optional[Path],
                    say: Callable[[str], None]) -> dict:
    """Held-out greedy accuracy and reward of the policy at ``model_path`` (``troupe.cluster.train.evaluate``
    on fresh engines and the stage's reward lanes, which are stopped afterwards)."""
    from ray.util.placement_group import remove_placement_group
    from transformers import AutoTokenizer

    from troupe.cluster.runtime import start_engines
    from troupe.cluster.train import evaluate
    from troupe.reward.router import RewardRouter
    from troupe.rollout.prompts import build_prompts

    d = cfg.data
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts, _ = build_prompts(eval_rows, tok, template=d.template, prompt_format=d.prompt_format,
                               system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens)
    if not prompts:
        return {}
    engines, pg = start_engines(cfg, model_path, log=say)
    rewards = None
    try:
        rewards = RewardRouter(cfg.reward, ready_timeout_s=cfg.cluster.rpc_timeout_s)
        return evaluate(SimpleNamespace(engines=engines, rewards=rewards), prompts, cfg, dump)
    finally:
        if rewards is not None:
            rewards.shutdown()
        engines.shutdown()
        remove_placement_group(pg)


# ------------------------------------------------------------------ the stage kinds


def _sft_examples(cfg: RunConfig, train_rows: list[dict]) -> list[tuple[str, str]]:
    """``sft.path``'s (prompt, completion) pairs, else the data-source plugin's cold-start examples."""
    if cfg.sft.path:
        from troupe.rollout.rejection import read_sft_file

        return read_sft_file(cfg.sft.path)
    from troupe.cluster.prepare import cold_start_examples, data_source

    if not cfg.data.is_plugin:
        raise ConfigError("sft stage: give sft.path (JSONL of prompt/completion) or a data-source plugin with "
                          "cold_start() as data.source")
    source, options = data_source(cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"enabled": True})}))
    return cold_start_examples(cfg, train_rows, source, options)


def _run_sft(cfg: RunConfig, model_path: str, folder: Path, train_rows: list[dict], say) -> dict:
    from troupe.cluster.prepare import prepare_model
    from troupe.cluster.sft_train import train_sft

    if model_path.startswith("builtin:"):  # build the tiny model (tokenizer trained on the task), no SFT there
        plain = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"enabled": False})})
        model_path, _ = prepare_model(plain, folder, train_rows, say)
    examples = _sft_examples(cfg, train_rows)
    out = train_sft(cfg, model_path, examples, str(folder / "model"), log=say)
    return {"policy": str(folder / "model"), "sft": out}


def _run_rejection(cfg: RunConfig, model_path: str, folder: Path, train_rows: list[dict], say) -> dict:
    from troupe.cluster.rejection import run_rejection_sampling
    from troupe.cluster.sft_train import train_sft
    from troupe.rollout.rejection import read_sft_file

    stats = run_rejection_sampling(cfg, model_path, folder, log=say)
    examples = read_sft_file(stats["sft_data"])
    out = train_sft(cfg, model_path, examples, str(folder / "model"), log=say)
    return {"policy": str(folder / "model"), "rejection": stats, "sft": out}


def _run_grpo(cfg: RunConfig, model_path: str, folder: Path, train_rows: list[dict], eval_rows: list[dict],
              source: str, say) -> dict:
    from troupe.cluster import checkpoint
    from troupe.cluster.runs import ResumePoint, RunStopped, train_on_ray

    resume = None
    last = checkpoint.latest(checkpoint.checkpoint_root(cfg, folder))
    if last is not None:
        state = checkpoint.load_state(last)
        resume = ResumePoint(last, folder, state, checkpoint.check_compatible(last, cfg))
        say(f"resuming inside the stage from {last}")
    try:  # RunFailed (a RuntimeError naming what failed) fails the stage
        summary = train_on_ray(cfg, train_rows, eval_rows, folder, resume=resume, config_path=source, model_path=model_path)
    except RunStopped as e:
        raise KeyboardInterrupt(f"the GRPO run was {e}") from e
    return {"policy": summary["checkpoint"], "eval": summary["eval_final"], "eval_start": summary["eval_start"]}


def _run_rm(cfg, say) -> dict:
    from troupe.cluster.rm_train import train_reward_model

    summary = train_reward_model(cfg, None, log=say)
    last = summary["epochs"][-1] if summary["epochs"] else {}
    return {"reward_model": summary["model"], "rm_eval": {k: v for k, v in last.items() if k.startswith("eval/")}}


def _clear_attempt(stage: Stage, folder: Path) -> None:
    """Remove what an earlier, unfinished attempt of ``stage`` left in its folder, unless it is a grpo
    stage with a complete checkpoint (that one resumes from it, metrics rolled back to the checkpoint)."""
    import shutil

    from troupe.cluster import checkpoint

    if not folder.exists():
        return
    if stage.kind == "grpo" and checkpoint.latest(checkpoint.checkpoint_root(stage.config, folder)) is not None:
        return
    shutil.rmtree(folder)


def run_stage(stage: Stage, policy: Optional[str], folder: Path, source: str, say) -> dict:
    """Run one stage in ``folder`` starting from ``policy``; returns its outputs (``policy`` for policy
    stages, ``reward_model`` for rm_train, ``eval`` when measured). Raises whatever the stage raises."""
    from troupe.cluster.prepare import load_task

    cfg = stage.config
    if stage.model_from_previous:
        if policy is None:
            raise ConfigError(f"{stage.label}: model.path is not set and no earlier stage wrote a policy")
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": policy})})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(dump_config(cfg))
    if stage.kind == "rm_train":
        return _run_rm(cfg, say)
    train_rows, eval_rows = load_task(cfg)
    model_path = cfg.model.path
    if stage.kind == "grpo":
        return _run_grpo(cfg, model_path, folder, train_rows, eval_rows, source, say)
    out = (_run_sft if stage.kind == "sft" else _run_rejection)(cfg, model_path, folder, train_rows, say)
    out["eval"] = evaluate_policy(cfg, out["policy"], eval_rows, folder / "eval.jsonl", say)
    return out


# ------------------------------------------------------------------ the pipeline


def summary_table(pipe: PipelineConfig, state: dict) -> str:
    """Markdown table: one row per stage (kind, status, held-out accuracy / RM pairwise accuracy, seconds, output)."""
    rows = ["| stage | kind | status | held-out greedy accuracy | held-out reward | seconds | output |",
            "|---|---|---|---|---|---|---|"]
    for s in pipe.stages:
        st = state["stages"].get(s.name, {})
        ev = st.get("eval") or {}
        acc = ev.get("eval/accuracy")
        if s.kind == "rm_train":
            rm_acc = (st.get("rm_eval") or {}).get("eval/accuracy")
            acc_text = f"RM pairwise {rm_acc:.3f}" if rm_acc is not None else "-"
        else:
            acc_text = f"{acc:.3f}" if acc is not None else "-"
        reward = ev.get("eval/reward_mean")
        secs = st.get("seconds")
        rows.append(f"| {s.name} | {s.kind} | {st.get('status', 'not run')} | {acc_text} | "
                    + (f"{reward:.3f}" if reward is not None else "-") + " | "
                    + (f"{secs:.0f}" if secs is not None else "-") + f" | {st.get('policy') or st.get('reward_model') or '-'} |")
    return "\n".join(rows)


def _need_cpus(pipe: PipelineConfig) -> float:
    """CPUs of the largest stage (stages run one at a time)."""
    need = 1.0
    for s in pipe.stages:
        c = s.config
        if s.kind == "rm_train":
            n = c.learner.num_ranks * c.learner.num_cpus_per_rank
        else:
            n = c.rollout.num_engines * c.rollout.num_cpus_per_engine + c.learner.num_ranks * c.learner.num_cpus_per_rank \
                + c.reward.num_workers * c.reward.num_cpus_per_worker + sum(m.num_workers * m.num_cpus for m in c.reward.models)
        need = max(need, n)
    return need


def run_pipeline(pipe: PipelineConfig, address: Optional[str], *, resume: bool = False,
                 say: Callable[[str], None] = print) -> int:
    """Run (or, with ``resume``, continue) every stage of ``pipe``; returns the exit status.

    0: every stage done; 1: a stage failed (the message names it and how to resume) or the Ray
    cluster cannot be joined; 2: the folder already holds a pipeline and ``resume`` is off, or a
    stage's config cannot be used.
    """
    import ray

    from troupe.cluster.runtime import join_ray

    folder = pipe.folder
    if (folder / STATE_FILE).exists() and not resume:
        say(f"{folder} already holds this pipeline ({STATE_FILE}); continue it with --resume, or give another "
            "name (name=...)")
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    state = read_state(folder) if resume else {"stages": {}}
    state["source"] = pipe.source
    t0 = time.time()
    try:
        join_ray(address or pipe.stages[0].config.cluster.address, _need_cpus(pipe))
    except ConnectionError as e:
        say(f"cannot join the Ray cluster: {e}")
        return 1
    policy: Optional[str] = None
    rc = 0
    try:
        for stage in pipe.stages:
            st = state["stages"].get(stage.name, {})
            if st.get("status") == "done":
                say(f"{stage.label}: done earlier ({st.get('policy') or st.get('reward_model')}), skipped")
            else:
                say(f"{stage.label}: starting" + (f" from {policy}" if stage.model_from_previous else ""))
                st = {"kind": stage.kind, "status": "running", "started": time.time()}
                state["stages"][stage.name] = st
                _write_state(folder, state)
                t_stage = time.time()
                _clear_attempt(stage, stage_dir(folder, stage.name))
                try:
                    st.update(run_stage(stage, policy, stage_dir(folder, stage.name), pipe.source, say))
                except (Exception, KeyboardInterrupt) as e:
                    st.update(status="failed", error=f"{type(e).__name__}: {e}", seconds=time.time() - t_stage)
                    _write_state(folder, state)
                    interrupted = isinstance(e, KeyboardInterrupt)
                    log.error(f"{stage.label} {'stopped' if interrupted else 'failed'}: {e}",
                              exc_info=not isinstance(e, (RuntimeError, TimeoutError, ConfigError, ValueError,
                                                          KeyboardInterrupt)))
                    say(f"pipeline stopped at {stage.label}; resume with: troupe train {pipe.source} --resume")
                    rc = 130 if interrupted else 1
                    break
                st.update(status="done", seconds=time.time() - t_stage)
                _write_state(folder, state)
                acc = (st.get("eval") or {}).get("eval/accuracy")
                say(f"{stage.label}: done in {st['seconds']:.0f} s"
                    + (f"; held-out greedy accuracy {acc:.3f}" if acc is not None else ""))
            if stage.kind in POLICY_KINDS:
                policy = st["policy"]
    finally:
        ray.shutdown()
    table = summary_table(pipe, state)
    (folder / "summary.md").write_text(f"# {pipe.name} ({pipe.source})\n\n{table}\n")
    (folder / "summary.json").write_text(json.dumps({**state, "wall_seconds": time.time() - t0}, indent=1, default=str))
    say(f"pipeline {pipe.name}: {'all stages done' if rc == 0 else 'stopped'} in {time.time() - t0:.0f} s\n{table}")
    return rc
