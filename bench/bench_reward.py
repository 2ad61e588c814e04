"""Reward-scoring throughput, and proof that generation does not wait for scoring.

What it measures (on the local machine, real Ray, no GPU needed):

1. Throughput (samples/s) of the reward pool with 1 and 2 workers on the GSM8K test split
   (1319 prompts, the gold solution as each of 8 completions per prompt = group size 8,
   reward ``gsm8k`` + ``format``), plus an in-process ``RewardSet.score`` baseline (no Ray).
   The same on MATH-500 with the ``math`` (math-verify) reward, a CPU-heavy verifier where
   a second worker matters.
2. A simulated producer ("generation") that makes one batch of groups every ``period``
   seconds (a sleep) and submits it to the pool without waiting. Its total time with the
   pool attached is compared with its time alone; the results are collected at the end,
   and the table reports how long after the last submit the last result arrived.

Usage::

    python bench/bench_reward.py [--quick] [--out bench/results/reward_throughput.md]

Writes a markdown table to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

import ray

from troupe.configs.schema import RewardConfig, RewardFunctionConfig
from troupe.core.types import Group, Prompt, Sample
from troupe.reward.pool import RewardPool
from troupe.reward.scoring import RewardSet
from troupe.rollout.data import load_preset

GROUP_SIZE = 8
BATCH_GROUPS = 32  # groups per submitted batch (256 samples)


def make_groups(preset: str, split: str | None, max_rows: int | None) -> list[Group]:
    """One group per data-set row, its gold solution repeated GROUP_SIZE times as completions."""
    rows = load_preset(preset, split, max_rows=max_rows)
    groups = []
    for i, r in enumerate(rows):
        prompt = Prompt(uid=i, text=r["question"], token_ids=[], question=r["question"], answer=r["answer"])
        samples = [
            Sample(response_ids=[], sampling_logprobs=[], text=r["solution"], truncated=False, policy_version=0)
            for _ in range(GROUP_SIZE)
        ]
        groups.append(Group(prompt=prompt, samples=samples))
    return groups


def _cfg(functions: list[str], workers: int) -> RewardConfig:
    return RewardConfig(
        num_workers=workers,
        num_cpus_per_worker=1.0,
        functions=[RewardFunctionConfig(name=f, weight=1.0) for f in functions],
        timeout_s=30.0,
    )


def bench_in_process(groups: list[Group], functions: list[str], repeats: int) -> tuple[float, float]:
    """(best seconds over ``repeats``, mean reward) scoring every group with a RewardSet here."""
    rewards = RewardSet(_cfg(functions, 1))
    g = groups[0]  # warm up (imports sympy for math), as the pool runs do
    rewards.score([g.prompt.question], [g.samples[0].text], {"answer": [g.prompt.answer]})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total, n = 0.0, 0
        for g in groups:
            res = rewards.score(
                [g.prompt.question] * g.size, [s.text for s in g.samples], {"answer": [g.prompt.answer] * g.size}
            )
            total += sum(r for r in res.rewards if r is not None)
            n += g.size
        best = min(best, time.perf_counter() - t0)
    return best, total / n


def bench_pool(groups: list[Group], functions: list[str], workers: int, repeats: int) -> tuple[float, float]:
    """(best seconds over ``repeats``, mean reward) for the pool: submit all batches, then get all."""
    pool = RewardPool(_cfg(functions, workers))
    best = float("inf")
    try:
        pool.score_now(groups[:workers])  # warm up: imports (sympy) in every worker
        for _ in range(repeats):
            t0 = time.perf_counter()
            refs = [pool.submit(groups[i : i + BATCH_GROUPS]) for i in range(0, len(groups), BATCH_GROUPS)]
            scored = pool.get_flat(refs)
            best = min(best, time.perf_counter() - t0)
    finally:
        pool.shutdown()
    rewards = [r for g in scored for r in g.rewards if r is not None]
    return best, sum(rewards) / max(1, sum(g.size for g in scored))


def bench_producer(groups: list[Group], functions: list[str], workers: int, period: float, batches: int) -> dict:
    """Producer timing alone vs with the pool attached (submitting without waiting)."""
    chunks = [[groups[(i * BATCH_GROUPS + j) % len(groups)] for j in range(BATCH_GROUPS)] for i in range(batches)]

    t0 = time.perf_counter()
    for _ in chunks:
        time.sleep(period)  # "generate" a batch
    alone = time.perf_counter() - t0

    pool = RewardPool(_cfg(functions, workers))
    try:
        pool.score_now(groups[:workers])
        refs = []
        submit_times = []
        t0 = time.perf_counter()
        for chunk in chunks:
            time.sleep(period)  # "generate" a batch
            ts = time.perf_counter()
            refs.append(pool.submit(chunk))  # hand it to the reward workers, do not wait
            submit_times.append(time.perf_counter() - ts)
        with_pool = time.perf_counter() - t0
        scored = pool.get_flat(refs)
        drained = time.perf_counter() - t0
    finally:
        pool.shutdown()
    assert all(len(g.rewards) == g.size for g in scored)
    return {
        "alone": alone,
        "with_pool": with_pool,
        "drain_after_last_submit": drained - with_pool,
        "max_submit_ms": 1000 * max(submit_times),
        "mean_submit_ms": 1000 * sum(submit_times) / len(submit_times),
        "batches": batches,
        "samples": sum(g.size for g in scored),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write and print the markdown table. Returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "reward_throughput.md"))
    ap.add_argument("--period", type=float, default=0.25, help="producer: seconds per generated batch")
    ap.add_argument("--batches", type=int, default=20, help="producer: batches generated")
    ap.add_argument("--repeats", type=int, default=3, help="throughput: best of this many runs")
    args = ap.parse_args(argv)

    gsm_rows = 200 if args.quick else None
    math_rows = 50 if args.quick else None
    gsm = make_groups("gsm8k", "test", gsm_rows)
    mth = make_groups("math500", None, math_rows)
    gsm_fns = ["gsm8k", "format"]
    math_fns = ["math"]

    load_before = os.getloadavg()[0]
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        rows = []
        for name, groups, fns in (("GSM8K test", gsm, gsm_fns), ("MATH-500", mth, math_fns)):
            n = sum(g.size for g in groups)
            dt, mean = bench_in_process(groups, fns, args.repeats)
            rows.append((name, "+".join(fns), "in-process (no Ray)", n, dt, n / dt, mean))
            for w in (1, 2):
                dt, mean = bench_pool(groups, fns, w, args.repeats)
                rows.append((name, "+".join(fns), f"pool, {w} worker{'s' if w > 1 else ''}", n, dt, n / dt, mean))
        prod = bench_producer(gsm, gsm_fns, 2, args.period, args.batches)
    finally:
        ray.shutdown()
    text = _report(args, rows, prod, load_before, os.getloadavg()[0])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def _report(args: argparse.Namespace, rows: list[tuple], prod: dict, load_before: float, load_after: float) -> str:
    """The markdown results: the throughput table and the producer comparison."""
    lines = [
        "# Reward scoring throughput",
        "",
        f"Generated by `bench/bench_reward.py{' --quick' if args.quick else ''}` on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}; {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, Ray {ray.__version__}. Completions are the gold solutions "
        "(so a mean reward of 1.000 means every one verified; `format` scores 0 on them, as gold solutions have "
        "no think/answer tags), "
        f"{GROUP_SIZE} per prompt (group size {GROUP_SIZE}); pool batches of {BATCH_GROUPS} groups, "
        f"all submitted at once, wall time from first submit to last result, best of {args.repeats} runs. Note: math-verify keeps a small cache (20 entries) of parsed "
        "LaTeX, so repeated answers (here all 8 samples of a group, as often in real groups) are cheaper "
        f"than distinct ones. 1-minute load average {load_before:.1f} before and {load_after:.1f} after the "
        "run (other jobs shared the machine; Ray workers run at a lower priority than the driver), so "
        "timings are noisy.",
        "",
        "| data | reward functions | scorer | samples | seconds | samples/s | mean reward |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, fns, how, n, dt, sps, mean in rows:
        lines.append(f"| {name} | {fns} | {how} | {n} | {dt:.2f} | {sps:,.0f} | {mean:.3f} |")
    lines += [
        "",
        "## Generation does not wait for scoring",
        "",
        f"A producer makes {prod['batches']} batches of {BATCH_GROUPS} GSM8K groups ({prod['samples']} samples), "
        f"one every {args.period} s (a sleep standing in for generation), and submits each to a 2-worker pool "
        "without waiting.",
        "",
        "| producer | total seconds |",
        "|---|---:|",
        f"| alone (no pool) | {prod['alone']:.3f} |",
        f"| with the pool attached (submit, no wait) | {prod['with_pool']:.3f} |",
        "",
        f"Overhead on the producer: {100 * (prod['with_pool'] / prod['alone'] - 1):+.2f}% "
        f"(submit call: mean {prod['mean_submit_ms']:.2f} ms, max {prod['max_submit_ms']:.2f} ms). "
        f"Last scored batch arrived {prod['drain_after_last_submit']:.3f} s after the last submit.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
