"""The GRPO training loop (DeepSeekMath arXiv 2402.03300, Algorithm 1), over Ray actors.

    for each step:
        sample a batch of prompts; engines draw G responses each (policy version v)
        reward workers score the groups while later chunks are still generating
        [reward.iterative: pairs from the groups; every K steps the reward model trains on them and its
         actors load the new weights (troupe.cluster.iterative)]
        [dynamic sampling: drop groups that are not informative, refill from more prompts]
        learner ranks: old/ref log-probs, reward shaping, advantages, clipped update (+ KL)
        every sync.every steps: weights -> engines as version v+1; check engine/learner logprobs agree
        every checkpoint.every steps: a resumable checkpoint (troupe.cluster.checkpoint)

With ``rollout.max_staleness`` = N > 0 the rollouts of the next steps run on a driver thread while
the learner trains (``troupe.cluster.rollout_ahead``): a group may then lag the learner by up to N
policy versions; older ones are dropped, counted and resampled (``troupe.rollout.staleness``), and
``algo.tis_cap`` corrects the off-policy gap with the engines' sampling log-probs.

Sampling seeds come from (run seed, step, prompt stream position) only, and the checkpoint holds
the learner state, the stream position and the metrics, so a resumed run repeats the
uninterrupted run's steps exactly (float32, CPU). Faults: engine deaths are survived by the engine
group (counted per step as ``faults/engine_restarts``); a step with a non-finite loss or gradient
norm changes no weight (``faults/nonfinite_steps``) and ``cluster.max_nonfinite_steps`` of them in
a row stop the run; SIGINT/SIGTERM finish the current step, checkpoint and stop (``RunStopped``).

The maths is in ``troupe.learner`` (``grpo``, ``step``); the actors in ``troupe.cluster.runtime``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from troupe.cluster import checkpoint
from troupe.cluster.metrics import MetricsWriter, mean_dicts, rollout_metrics
from troupe.cluster.ray_metrics import RayMetrics
from troupe.cluster.rollout_ahead import RolloutAhead
from troupe.cluster.runtime import Actors
from troupe.cluster.weight_sync import WeightSync
from troupe.configs.schema import RunConfig
from troupe.core.types import Group, Prompt, Sampling, TrainBatch
from troupe.learner import grpo
from troupe.learner.batch import collate_groups
from troupe.learner.gae import critic_metrics
from troupe.learner.step import group_signal, informative
from troupe.reward.passk import accuracy_function, eval_metrics
from troupe.rollout.prompts import PromptStream, sampling_seeds
from troupe.rollout.staleness import split_stale, staleness_metrics

log = logging.getLogger("troupe")
say = log.info  # the run's log: stdout and run_dir/log.txt (troupe.cluster.runs.run_logger)

# max |engine - learner| log-prob (nats) on a fixed sequence after a weight sync; above it the
# loop warns. float32 measured ~1e-6, bfloat16 0.019 (tests/test_engine_slow.py).
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 5e-2}


def sampling(cfg: RunConfig) -> Sampling:
    """The training sampling settings: G samples per prompt; step ends for step-reward estimators."""
    ro = cfg.rollout
    delimiter = cfg.reward.step_delimiter if cfg.algo.advantage.uses_step_rewards else None
    return Sampling(n=ro.group_size, max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
                    step_delimiter=delimiter)


def _generate(actors: Actors, stream: PromptStream, n: int, cfg: RunConfig, step: int) -> tuple[list[Group], dict]:
    prompts, positions = stream.take(n)
    return actors.engines.generate(prompts, sampling(cfg), actors.rewards, seeds=sampling_seeds(cfg.seed, step, positions))


def collect_groups(actors: Actors, stream: PromptStream, cfg: RunConfig, step: int) -> tuple[list[Group], dict]:
    """One step's scored groups; with dynamic sampling (DAPO) groups that are not informative are replaced."""
    need = cfg.rollout.prompts_per_step
    groups, t = _generate(actors, stream, need, cfg, step)
    info = {"time/generate": t["generate"], "time/reward": t["reward"],
            **{f"time/generate/engine_{e}": b for e, b in enumerate(t.get("engine_busy", []))}}
    if not cfg.algo.dynamic_sampling:
        return groups, info
    steps = cfg.algo.advantage.uses_step_rewards

    def split(gs: list[Group]) -> tuple[list[Group], list[Group]]:
        flags = [informative(group_signal(g, steps)) for g in gs]
        return [g for g, f in zip(gs, flags) if f], [g for g, f in zip(gs, flags) if not f]

    (kept, dropped), rounds = split(groups), 0
    while len(kept) < need and rounds < cfg.algo.max_refill_rounds:
        rounds += 1
        more, t = _generate(actors, stream, need - len(kept), cfg, step)
        for key in ("generate", "reward"):
            info[f"time/{key}"] += t[key]
        good, bad = split(more)
        kept, dropped = kept + good, dropped + bad
    info.update({"dynamic/refill_rounds": rounds, "dynamic/informative_groups": min(len(kept), need)})
    return (kept + dropped)[:need], info  # short of informative groups: pad with zero-advantage ones


def rollout(step: int, cfg: RunConfig, actors: Actors, stream: PromptStream,
            ahead: Optional[RolloutAhead]) -> tuple[list[Group], dict]:
    """Step ``step``'s scored groups: sampled now (synchronous loop) or taken from ``ahead`` (pipelined).

    Pipelined, a group more than ``rollout.max_staleness`` versions behind the learner (version
    step - 1) is dropped, counted (``staleness/dropped_groups``) and its prompt sampled again with the
    engines' current weights (seeds from (seed, step, -1 - index), apart from the stream's).
    Info: the rollout timings, ``time/learner_idle`` (s the learner waited for the groups) and,
    pipelined, the staleness metrics and ``time/engine_idle``.
    """
    if ahead is None:
        t0 = time.time()
        groups, info = collect_groups(actors, stream, cfg, step)
        return groups, {**info, "time/learner_idle": time.time() - t0}
    groups, info = ahead.get(step)
    N = cfg.rollout.max_staleness
    _, dropped = split_stale(groups, step - 1, N)
    if dropped:
        with ahead.paused():  # the engines and reward workers are driven by one thread at a time
            fresh, _ = actors.engines.generate([groups[i].prompt for i in dropped], sampling(cfg), actors.rewards,
                                               seeds=sampling_seeds(cfg.seed, step, [-1 - i for i in dropped]))
        groups = list(groups)
        for i, g in zip(dropped, fresh):
            groups[i] = g
    return groups, {**info, **staleness_metrics(groups, step - 1, N, len(dropped))}


def learn(step: int, cfg: RunConfig, actors: Actors, batch: TrainBatch) -> dict:
    """The learner side of a step: the policy's update; with a critic (PPO, ``algo.advantage: gae``) the critic's
    values of the batch first, then the policy's update (GAE advantages from those values), then the critic's
    update towards the returns the policy's ranks computed. The policy keeps its weights for the first
    ``critic.freeze_policy_steps`` steps. Critic metrics: ``critic/*`` (value loss, grad norm, clip fraction,
    explained variance, values and returns means) and ``time/critic`` (s)."""
    if actors.critic is None:
        return actors.learners.train_step(batch)
    t0 = time.time()
    batch = batch.with_(values=torch.cat(actors.critic.call("values", batch)))
    t1 = time.time()
    out = actors.learners.train_step(batch, step > cfg.critic.freeze_policy_steps)
    t2 = time.time()
    returns = out.pop("critic/returns")
    out.update(mean_dicts(actors.critic.call("train_step", batch, returns)),
               **critic_metrics(batch.values, returns, batch.response_mask),
               **{"time/critic": t1 - t0 + time.time() - t2})
    return out


def check_sync(actors: Actors, token_ids: list[int], start: int) -> float:
    """Max |engine - learner| log-prob over ``token_ids[start:]`` for every engine (nats)."""
    learner_lp = actors.learners.sequence_logprobs(token_ids, start)
    return max(max(abs(x - y) for x, y in zip(learner_lp, lp)) for lp in actors.engines.sequence_logprobs(token_ids, start))


def evaluate(actors: Actors, prompts: list[Prompt], cfg: RunConfig, dump: Path | None = None) -> dict:
    """Held-out evaluation through the engines: reward, every function's mean, accuracy, pass@k, maj@k.

    ``eval.n`` = 1: one greedy (temperature 0) completion per prompt; > 1: ``eval.n`` samples at
    ``eval.temperature``. ``eval/accuracy`` is the share of samples that the ``eval.accuracy``
    function (default: the built-in accuracy function present,
    :func:`troupe.reward.passk.accuracy_function`) scores >= ``eval.correct_at``; its mean score
    stays in ``eval/reward/<fn>_mean``. pass@k / maj@k for each ``eval.k``
    (:func:`troupe.reward.passk.eval_metrics`). With ``dump``, every sample's
    completion and scores are written there as JSONL (one line per sample).
    """
    ev = cfg.eval
    sampling = Sampling(n=ev.n, max_new_tokens=cfg.rollout.max_new_tokens, temperature=0.0 if ev.n == 1 else ev.temperature)
    groups, t = actors.engines.generate(prompts, sampling, actors.rewards)
    names = [f.name for f in cfg.reward.functions]
    acc = accuracy_function(names, ev.accuracy)
    if dump is not None:
        with open(dump, "w") as f:
            for g in groups:
                for i, smp in enumerate(g.samples):
                    f.write(json.dumps({"uid": g.prompt.uid, "sample": i, "question": g.prompt.question,
                                        "answer": g.prompt.answer, "completion": smp.text, "reward": g.rewards[i],
                                        "parts": {k: v[i] for k, v in g.reward_parts.items()},
                                        "response_tokens": len(smp.response_ids)}) + "\n")
    return {**rollout_metrics(groups, prefix="eval/", accuracy=acc),
            **eval_metrics(groups, acc, ks=ev.k if ev.n > 1 else (1,), correct_at=ev.correct_at),
            "eval/seconds": t["generate"] + t["reward"]}


def eval_summary(ev: dict) -> str:
    """One line for the log: held-out reward, accuracy when known, pass@k/maj@k, every function's mean."""
    parts = [f"reward {ev.get('eval/reward_mean', float('nan')):.3f}"]
    parts += [f"{k[5:]} {v:.3f}" for k, v in ev.items() if k == "eval/accuracy" or "@" in k]
    fns = {k[len("eval/reward/"):-len("_mean")]: v for k, v in ev.items() if k.startswith("eval/reward/") and k.endswith("_mean")}
    return "; ".join(parts) + (" (" + ", ".join(f"{k} {v:.3f}" for k, v in fns.items()) + ")" if fns else "")


def sync_weights(actors: Actors, sync: WeightSync, version: int, probe: Group, cfg: RunConfig) -> dict:
    """Weights -> engines as ``version``, then the engine/learner log-prob check on ``probe``'s first sample."""
    out = sync.sync(version)
    out["time/sync"] = out["sync_seconds"]
    ids = probe.prompt.token_ids + probe.samples[0].response_ids
    out["sync/logprob_max_diff"] = diff = check_sync(actors, ids, len(probe.prompt.token_ids))
    if diff > SYNC_TOLERANCE[cfg.model.dtype]:
        say(f"warning: after weight sync v{version} engines and learner disagree by {diff:.3g} nats on a fixed "
            f"sequence (tolerance {SYNC_TOLERANCE[cfg.model.dtype]} for {cfg.model.dtype})")
    return out


@dataclass
class RunState:
    """What the driver carries from step to step; saved in every checkpoint (with the prompt stream)."""

    step: int = 0
    policy_version: int = 0
    nonfinite_in_a_row: int = 0
    engine_restarts: int = 0
    model_path: str = ""
    run_dir: str = ""
    eval_start: dict = field(default_factory=dict)
    iterative: dict = field(default_factory=dict)  # IterativeRewardModel.state_dict() (reward.iterative)


class RunStopped(Exception):
    """SIGINT/SIGTERM stopped the run after a complete step. ``signum``; ``checkpoint`` (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                         + (f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (checkpoint.every is 0)"))


class StopSignals:
    """While active, SIGINT/SIGTERM ask the loop to stop after the current step; a second one stops at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def save_checkpoint(cfg: RunConfig, run_dir: Path, actors: Actors, stream: PromptStream, state: RunState,
                    ahead: Optional[RolloutAhead] = None) -> Path:
    """A resumable checkpoint of the run as it is after ``state.step`` (troupe.cluster.checkpoint).

    Pipelined (``ahead``), the prompt stream is saved as it was before step ``state.step + 1``
    took its prompts: a resumed run samples the prefetched steps again.
    """
    t0 = time.time()
    with ahead.paused() if ahead is not None else contextlib.nullcontext():
        stream_state = (ahead.stream_state_before(state.step + 1) if ahead is not None else None) or stream.state_dict()
        path = checkpoint.save(checkpoint.checkpoint_root(cfg, run_dir), state.step, actors.learners,
                               {**asdict(state), "stream": stream_state}, cfg, run_dir / "metrics.jsonl",
                               cfg.checkpoint.keep_last, critic=actors.critic)
    say(f"checkpoint {path} ({time.time() - t0:.1f} s)")
    return path


def resume_from(path: Path, actors: Actors, sync: WeightSync, stream: PromptStream, eval_prompts: list[Prompt]) -> RunState:
    """Restore learner (and critic) ranks and prompt stream from checkpoint ``path``; the engines get its weights."""
    saved = checkpoint.load_state(path)
    actors.learners.load_checkpoint(str(path / "learner"))
    if actors.critic is not None:
        actors.critic.load_checkpoint(str(path / "critic"))
    stream.load_state_dict(saved.pop("stream"))
    state = RunState(**{k: v for k, v in saved.items() if k in RunState.__dataclass_fields__})
    sync.sync(state.policy_version)
    diff = check_sync(actors, eval_prompts[0].token_ids, 1) if eval_prompts else float("nan")
    say(f"resumed from {path}: step {state.step}, policy v{state.policy_version} in every engine "
        f"(engine/learner log-prob diff {diff:.2g} nats)")
    return state


def run_step(step: int, cfg: RunConfig, actors: Actors, sync: WeightSync, stream: PromptStream, state: RunState,
             eval_prompts: list[Prompt], pad_id: int, run_dir: Path,
             ahead: Optional[RolloutAhead] = None) -> dict:
    """One GRPO step: rollout, learner update, weight sync, periodic eval / HF export. Returns its metrics.

    Pipelined (``ahead``): the groups come from the rollout thread, which is paused while the
    weights are synced and evaluated, and told the new version afterwards.
    """
    t_step, restarts = time.time(), actors.engines.restarts
    groups, record = rollout(step, cfg, actors, stream, ahead)
    record.update(rollout_metrics(groups))
    if actors.iterative is not None:  # iterative RL: new reward-model weights score the next step's samples
        record.update(actors.iterative.step(step, groups, actors.rewards))
        state.iterative = actors.iterative.state_dict()
    batch = collate_groups(groups, pad_id, mask_truncated=cfg.algo.mask_truncated)
    t_learn = time.time()
    record.update(learn(step, cfg, actors, batch), **{"time/learn": time.time() - t_learn})
    state.nonfinite_in_a_row = state.nonfinite_in_a_row + 1 if record.get("faults/nonfinite_steps") else 0
    if state.nonfinite_in_a_row:
        say(f"step {step}: loss or gradient norm not finite, update skipped ({state.nonfinite_in_a_row} in a row)")
    if state.nonfinite_in_a_row >= cfg.cluster.max_nonfinite_steps:
        raise RuntimeError(f"{state.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient norm "
                           f"(cluster.max_nonfinite_steps = {cfg.cluster.max_nonfinite_steps}); their updates were "
                           "skipped and the run stops")
    if record.get("zero_variance_frac") == 1.0:
        say(grpo.ZERO_VARIANCE_MESSAGE)
    with ahead.paused() if ahead is not None else contextlib.nullcontext():
        if step % cfg.sync.every == 0 or step == cfg.steps:
            state.policy_version = step
            record.update(sync_weights(actors, sync, step, groups[0], cfg))
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            record.update(evaluate(actors, eval_prompts, cfg))
        if ahead is not None:
            ahead.published(state.policy_version)
    if cfg.save_every and step % cfg.save_every == 0:
        actors.learners.save_hf(str(run_dir / "checkpoints" / f"step_{step}"), str(run_dir / "tokenizer"))
    state.step = step
    record["faults/engine_restarts"] = actors.engines.restarts - restarts  # in generation, sync or checks
    state.engine_restarts += record["faults/engine_restarts"]
    record.update(step=step, policy_version=state.policy_version, **{"time/step": time.time() - t_step})
    if ahead is None:  # the engines wait for everything after their rollout
        record["time/engine_idle"] = record["time/step"] - record["time/learner_idle"]
    return record


def _initial_state(cfg: RunConfig, run_dir: Path, actors: Actors, sync: WeightSync, stream: PromptStream,
                   eval_prompts: list[Prompt], writer: MetricsWriter, model_path: str,
                   resume: Optional[Path]) -> RunState:
    """The run state before the first step: restored from checkpoint ``resume`` (weights, stream, iterative
    reward model), or new with the held-out evaluation of the starting policy (written as step 0)."""
    if cfg.reward.iterative is not None and actors.iterative is None:
        from troupe.cluster.iterative import IterativeRewardModel

        actors.iterative = IterativeRewardModel(cfg, run_dir, say)
    if resume is not None:
        state = resume_from(resume, actors, sync, stream, eval_prompts)
        if actors.iterative is not None and state.iterative:
            actors.iterative.load_state_dict(state.iterative, actors.rewards)
    else:
        # absolute, so that --resume works from any working directory
        local = Path(model_path).exists()
        state = RunState(model_path=str(Path(model_path).resolve()) if local else model_path,
                         run_dir=str(Path(run_dir).resolve()),
                         eval_start=evaluate(actors, eval_prompts, cfg, run_dir / "eval_start.jsonl"))
        writer.write({"step": 0, **state.eval_start})
    say(f"start: held-out on {len(eval_prompts)} prompts: {eval_summary(state.eval_start)}")
    return state


def train(cfg: RunConfig, run_dir: Path, actors: Actors, eval_prompts: list[Prompt], pad_id: int,
          stream: PromptStream, *, model_path: str = "",
          resume: Optional[Path] = None) -> dict:
    """Run GRPO steps up to ``cfg.steps`` (from checkpoint ``resume`` if given); returns the summary.

    Raises ``RunStopped`` after SIGINT/SIGTERM (a checkpoint written when checkpoints are on);
    ``troupe.core.rpc.ActorFailed`` / ``RemoteTimeout`` when a learner rank dies or a call hangs;
    ``RuntimeError`` after too many engine failures or non-finite steps in a row.
    """
    sync = WeightSync(actors.learners, actors.engines, cfg.sync.strategy, actors.single_node(), cfg.sync.bucket_mb,
                      cfg.sync.timeout_s)
    if resume is not None:  # the metrics as they were at the checkpoint; later records are dropped
        shutil.copyfile(resume / "metrics.jsonl", run_dir / "metrics.jsonl")
    # metrics.jsonl, TensorBoard, W&B (cfg.wandb) and the Ray dashboard's gauges (troupe_<key>)
    writer = MetricsWriter(run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb, config=cfg.model_dump(mode="json"),
                           run_name=run_dir.name, sinks=[RayMetrics(cfg.name).export])
    ahead: Optional[RolloutAhead] = None
    try:
        state = _initial_state(cfg, run_dir, actors, sync, stream, eval_prompts, writer, model_path, resume)
        record: dict = {}
        if cfg.rollout.max_staleness and state.step < cfg.steps:
            ahead = RolloutAhead(lambda s: collect_groups(actors, stream, cfg, s), state.step + 1, cfg.steps,
                                 cfg.rollout.max_staleness, state.policy_version, stream.state_dict)
            say(f"pipelined rollout: engines sample up to {cfg.rollout.max_staleness} step(s) ahead of the learner")
        bar = tqdm(range(state.step + 1, cfg.steps + 1), desc="grpo", dynamic_ncols=True)
        t_start = time.time()
        with StopSignals() as stop:
            for step in bar:
                record = run_step(step, cfg, actors, sync, stream, state, eval_prompts, pad_id, run_dir, ahead)
                writer.write(record)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record.get('accuracy', float('nan')):.3f}",
                                kl=f"{record.get('kl_ref', 0.0):.4f}", v=state.policy_version)
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    save_checkpoint(cfg, run_dir, actors, stream, state, ahead)
                if stop.signum is not None:
                    raise RunStopped(stop.signum, step,
                                     _stop_checkpoint(cfg, run_dir, actors, sync, stream, state, ahead))
                if cfg.time_budget_s is not None and time.time() - t_start >= cfg.time_budget_s and step < cfg.steps:
                    say(f"time budget of {cfg.time_budget_s:g} s used up after step {step} of {cfg.steps}")
                    with ahead.paused() if ahead is not None else contextlib.nullcontext():
                        if state.policy_version != state.step:  # the final eval samples the final weights
                            state.policy_version = state.step
                            sync.sync(state.step)
                    break
        if ahead is not None:
            ahead.close()
        final = evaluate(actors, eval_prompts, cfg, run_dir / "eval_final.jsonl")
        writer.write({"step": state.step, "final": True, **final})
        ckpt = actors.learners.save_hf(str(run_dir / "checkpoints" / "final"), str(run_dir / "tokenizer"))
    finally:
        if ahead is not None and not ahead.close(timeout=10.0):
            say("rollout thread still inside a remote call after 10 s: abandoned (the actors stop next)")
        sync.close()
        writer.close()
    return {"eval_start": state.eval_start, "eval_final": final, "last_step": record, "checkpoint": ckpt,
            "policy_version": state.policy_version, "faults/engine_restarts": state.engine_restarts,
            "steps_done": state.step}


def _stop_checkpoint(cfg: RunConfig, run_dir: Path, actors: Actors, sync: WeightSync, stream: PromptStream,
                     state: RunState, ahead: Optional[RolloutAhead] = None) -> Optional[Path]:
    """The checkpoint a signal-stopped run leaves (None when checkpoints are off).

    Pipelined (``ahead``), the prefetched steps are not saved: their stream position is, and a
    resumed run samples them again.
    """
    if not cfg.checkpoint.every:
        return None
    done = checkpoint.latest(checkpoint.checkpoint_root(cfg, run_dir))
    if done is not None and done.name == f"step_{state.step}":
        return done
    with ahead.paused() if ahead is not None else contextlib.nullcontext():
        if state.policy_version != state.step:  # a checkpoint needs engines holding the learner's weights
            state.policy_version = state.step
            sync.sync(state.step)
        return save_checkpoint(cfg, run_dir, actors, stream, state, ahead)
