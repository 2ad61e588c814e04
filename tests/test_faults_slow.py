"""Faults on the real stack (local Ray, vLLM CPU engines, DeepSpeed over gloo), injected on purpose.

Every run is a real ``troupe train``: in a subprocess where the test has to signal or kill the
driver or one of its actor processes (found among the driver's descendants by their Ray process
title, e.g. ``ray::RolloutEngine``), in-process otherwise. What each test shows is in docs/faults.md's
fault table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from troupe.cluster.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "arith_cpu.yaml")
LENGTH = f"{REPO / 'tests' / 'e2e_rewards.py'}:length_reward"
# 4 prompts x G=4 per step, 2 ZeRO ranks, no cold start: the graded length reward keeps every group informative
BASE = [
    "sft.enabled=false", "data.options.num_train=512", "data.num_eval=8", "rollout.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_new_tokens=16", "learner.micro_batch_size=4", "learner.num_ranks=2",
    "learner.num_cpus_per_rank=0.5", "rollout.num_cpus_per_engine=1", "learner.lr=0.001", "eval_every=0",
    f"reward.functions=[{{name: accuracy}}, {{name: '{LENGTH}', weight: 0.01}}]",
]
# keys whose values are wall-clock times, not results
TIMING = ("time", "seconds")
# the sync check's engine-side prompt log-probs (a diagnostic of the engine's numerics, not a training
# result) differ by float32 rounding between a long-running and a fresh engine: 9.5e-7 vs 4.8e-7 nats
DIAGNOSTIC = ("sync/logprob_max_diff",)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run_dir) if r.get("step", 0) >= 1 and not r.get("final")}


def _results(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(t in k for t in TIMING) and k not in DIAGNOSTIC}


def _start(tmp_path: Path, name: str, extra: list[str], paced: bool = False) -> subprocess.Popen:
    """``troupe train`` in a subprocess, on an embedded Ray cluster of its own (not the session's head,
    tests/conftest.py): the test finds its actors among the driver's descendants, and its workers inherit
    this environment. ``paced``: every length-reward call waits 0.25 s (tests/e2e_rewards.py; a step makes
    several), so a run killed after a checkpoint is still running when the kill lands (the test polls every
    0.1 s; the remaining steps take 0.3 s each unpaced, over 1 s paced)."""
    log = open(tmp_path / f"{name}.out", "w")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"E2E_REWARD_DELAY_S": "0.25"} if paced else {})
    return subprocess.Popen([sys.executable, "-m", "troupe.cluster.cli", "train", CONFIG, f"output_dir={tmp_path}",
                             f"name={name}", *BASE, *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 900.0) -> None:
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.time() - t0 < timeout, f"no {what} after {timeout} s"
        time.sleep(0.1)


def _actor_procs(driver: subprocess.Popen, title: str) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(driver.pid).children(recursive=True):
        try:
            if any(title in part for part in p.cmdline()[:1]):
                out.append(p)
        except psutil.Error:
            pass
    return out


def _has_step(run_dir: Path, step: int):
    return lambda: (run_dir / "metrics.jsonl").exists() and step in _steps(run_dir)


# Bit-exact resume needed sampling seeds from (seed, step, prompt), every RNG in the checkpoint, and
# DeepSpeed's CPU Adam bias-correction product rebuilt as an uninterrupted run builds it
# (``replay_adam_step_product``; without it the learner's numbers drifted by ~1e-7 relative).


# extra overrides of the killed-and-resumed runs: checkpoints at steps 2 and 4, KL on (the reference's
# numbers are in the checkpoint too)
RESUMED = ["steps=5", "checkpoint.every=2", "algo.kl_coef=0.01"]


def _assert_resumed_bit_for_bit(whole: dict[int, dict], run_dir: Path) -> None:
    """The run killed after its step-2 checkpoint and resumed wrote the same metrics as the uninterrupted run
    ``whole`` for every step, bit for bit (rollout and learner numbers), and its own checkpoints."""
    resumed = _steps(run_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # records written after the checkpoint by the killed run are gone
    assert all(whole[s]["grad_norm"] > 0 for s in whole)
    assert {"reward_mean", "loss", "grad_norm", "kl_ref", "entropy", "response_len_mean"} <= set(_results(whole[3]))
    assert any(whole[s]["kl_ref"] != whole[s + 1]["kl_ref"] for s in (3, 4))  # the learner moved after the resume
    for s in (1, 2, 3, 4, 5):
        assert _results(resumed[s]) == _results(whole[s]), f"step {s} differs after resume"
    assert all(resumed[s]["sync/logprob_max_diff"] < 1e-5 for s in resumed)
    assert "resumed from" in (run_dir / "log.txt").read_text()
    # keep_last 2 (default): the checkpoints of steps 2 and 4
    assert sorted(p.name for p in (run_dir / "resume").iterdir()) == ["step_2", "step_4"]


def test_resume_after_sigkill_of_the_driver(tmp_path):
    """float32, fixed seed, ZeRO-3: killed with SIGKILL after the step-2 checkpoint and resumed, the run writes
    the same metrics as the uninterrupted run for every step, bit for bit. ZeRO-2's bit-exact resume is
    shown by the learner-rank test below (a killed rank instead of a killed driver)."""
    extra = [*RESUMED, "learner.zero_stage=3"]
    assert main(["train", CONFIG, f"output_dir={tmp_path}", "name=whole", *BASE, *extra]) == 0
    whole = _steps(tmp_path / "whole")

    run_dir = tmp_path / "killed"
    proc = _start(tmp_path, "killed", extra, paced=True)
    _wait_for(lambda: (run_dir / "resume" / "step_2" / "trainer_state.json").exists(), proc, "checkpoint step_2")
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert main(["train", CONFIG, f"output_dir={tmp_path}", "name=killed", *BASE, *extra, "--resume"]) == 0
    _assert_resumed_bit_for_bit(whole, run_dir)


def test_sigint_checkpoints_and_leaves_nothing_behind(tmp_path):
    """Ctrl-C: the current step finishes, a checkpoint is written, every process the run started exits,
    no weight file and no vLLM shared-memory segment is left in /dev/shm; exit status 130. vLLM's engine core
    runs in its own processes here (rollout.engine_core=subprocess, the GPU default): they must exit too, and
    their message queues are the segments."""
    shm_before = set(os.listdir("/dev/shm"))
    run_dir = tmp_path / "ctrlc"
    proc = _start(tmp_path, "ctrlc", ["steps=50", "checkpoint.every=5", "rollout.engine_core=subprocess"])
    _wait_for(_has_step(run_dir, 1), proc, "step 1")
    started = psutil.Process(proc.pid).children(recursive=True)
    engines = _actor_procs(proc, "ray::RolloutEngine")
    assert engines and _actor_procs(proc, "ray::LearnerRank")
    from troupe.rollout.engine import shm_segments_of

    segments = [x for p in engines for x in shm_segments_of(p.pid)]  # vLLM's message queues (issue 26)
    assert segments
    proc.send_signal(signal.SIGINT)
    assert proc.wait(300) == 130
    stopped = max(_steps(run_dir))
    assert stopped < 50
    log = (run_dir / "log.txt").read_text()
    assert f"stopped by SIGINT after step {stopped}" in log and "--resume" in log
    assert (run_dir / "resume" / f"step_{stopped}" / "trainer_state.json").exists()
    _, alive = psutil.wait_procs(started, timeout=60)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"
    left = {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("troupe-")}
    left |= {x for x in segments if os.path.exists(x)}
    assert not left, f"left in /dev/shm: {left}"


def test_learner_rank_killed_stops_with_its_name_and_resumes(tmp_path):
    """A learner rank killed with SIGKILL after the step-2 checkpoint (ZeRO-2): the run stops within a bounded
    time, names the rank and the last checkpoint, exits 1; --resume then completes the run with the same
    metrics as the uninterrupted run, bit for bit."""
    assert main(["train", CONFIG, f"output_dir={tmp_path}", "name=whole", *BASE, *RESUMED]) == 0
    whole = _steps(tmp_path / "whole")

    run_dir = tmp_path / "rank"
    proc = _start(tmp_path, "rank", RESUMED, paced=True)
    _wait_for(lambda: (run_dir / "resume" / "step_2" / "trainer_state.json").exists(), proc, "checkpoint step_2")
    ranks = _actor_procs(proc, "ray::LearnerRank")
    assert len(ranks) == 2
    ranks[-1].kill()
    t0 = time.time()
    assert proc.wait(300) == 1
    assert time.time() - t0 < 300
    log = (run_dir / "log.txt").read_text()
    assert "learner rank" in log and "run failed" in log
    assert "last complete checkpoint" in log and "--resume" in log
    assert main(["train", CONFIG, f"output_dir={tmp_path}", "name=rank", *BASE, *RESUMED, "--resume"]) == 0
    _assert_resumed_bit_for_bit(whole, run_dir)


def test_engine_and_reward_worker_killed_mid_run(tmp_path):
    """The engine and the reward worker, each killed with SIGKILL during the run: both are replaced, every
    step still trains on all its groups, the restarts are counted."""
    run_dir = tmp_path / "engine"
    proc = _start(tmp_path, "engine", ["steps=6", "learner.num_ranks=1"], paced=True)
    _wait_for(_has_step(run_dir, 1), proc, "step 1")
    [engine] = _actor_procs(proc, "ray::RolloutEngine")
    engine.kill()
    _wait_for(_has_step(run_dir, 3), proc, "step 3")
    workers = _actor_procs(proc, "ray::RewardWorker")
    assert workers
    workers[0].kill()
    assert proc.wait(900) == 0
    steps = _steps(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(r["num_samples"] == 16 for r in steps.values())  # 4 prompts x G=4: no group lost, none twice
    assert sum(r["faults/engine_restarts"] for r in steps.values()) == 1
    assert sum(r.get("reward/failures/worker_restart", 0) for r in steps.values()) >= 1
    assert "restarted" in (run_dir / "log.txt").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["faults/engine_restarts"] == 1


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """A policy loss that is NaN every step: each update is skipped and counted; after
    cluster.max_nonfinite_steps in a row the run stops and says why. Called as a library
    (``troupe.cluster.runs.train``): it raises ``RunFailed`` naming the cause and the (absent) checkpoint."""
    import fault_plugins  # noqa: F401  (registers algo.policy_loss 'nan_loss' here; the ranks import it by name)

    from troupe.cluster.prepare import load_task
    from troupe.cluster.runs import RunFailed, train
    from troupe.configs.schema import load_config

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    cfg = load_config(CONFIG, [f"output_dir={tmp_path}", "name=nan", *BASE, "steps=4", "algo.policy_loss=nan_loss",
                               "cluster.max_nonfinite_steps=2", "learner.num_ranks=1"])
    with pytest.raises(RunFailed, match="2 steps in a row had a non-finite loss") as failed:
        train(cfg, *load_task(cfg))
    assert failed.value.checkpoint is None and failed.value.run_dir == tmp_path / "nan"
    steps = _steps(tmp_path / "nan")
    assert sorted(steps) == [1]  # step 2's record is not written: the run stops inside it
    assert steps[1]["faults/nonfinite_steps"] == 1
    log = (tmp_path / "nan" / "log.txt").read_text()
    assert "2 steps in a row had a non-finite loss or gradient norm" in log
