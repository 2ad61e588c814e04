"""Step time of synchronous vs pipelined GRPO (``rollout.max_staleness`` 0, 1, 2, ...) on one config.

One cold-start SFT run (``steps=0``) writes the starting policy; then every staleness bound runs
the same GRPO steps from it, each in its own ``troupe train`` process (fresh Ray, same seed). For
each run the table gives, averaged over the steps after the first (warm-up), the step time (the
loop's wall clock per step), the rollout time (generate + reward wait) and the learner time
measured in the same run, and step / max(rollout, learn): the synchronous loop pays about
rollout + learn + sync, a pipelined one should approach max(rollout, learn) (issue goal: <= 1.15x).
Also: how long the learner and the engines waited, the mean staleness, held-out greedy accuracy
before and after, and the GRPO wall time.

With ``--time-budget S`` every run stops after the step that used up S seconds of GRPO
(``time_budget_s``): the accuracy columns then compare what each mode reached in the same budget.

Usage::

    python bench/bench_pipeline.py [--config configs/arith_cpu.yaml] [--staleness 0 1 2] [--steps 12]
        [--time-budget S] [--name demo] [--out bench/results/pipeline_demo.md] [--init SFT_DIR] [OVERRIDE ...]

On a shared 2-core machine the engine, the learner rank and the driver compete for the same cores:
compare the ratios measured in one run, and repeat the bench.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TROUPE = [sys.executable, "-m", "troupe.cluster.cli"]


def _train(config: str, out: Path, name: str, overrides: list[str]) -> tuple[Path, float]:
    t0 = time.time()
    cmd = TROUPE + ["train", config, f"output_dir={out}", f"name={name}", *overrides]
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {out / (name + '.log')}")
    return out / name, time.time() - t0


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(run_dir: Path) -> dict:
    """Averages over steps >= 2 of a run's metrics.jsonl, and its held-out accuracy before/after."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("step", 0) >= 1 and not r.get("final") and "time/step" in r]
    warm = steps[1:] or steps
    summary = json.loads((run_dir / "summary.json").read_text())
    old_logp = yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]["old_logp"]  # as the run resolved it

    def avg(key: str) -> float:
        return _mean([r.get(key, 0.0) for r in warm])

    rollout = _mean([r["time/generate"] + r["time/reward"] for r in warm])
    learn, step = avg("time/learn"), avg("time/step")
    return {"old_logp": old_logp, "steps": len(steps), "step": step, "rollout": rollout, "learn": learn, "sync": avg("time/sync"),
            "ratio": step / max(rollout, learn), "learner_idle": avg("time/learner_idle"),
            "engine_idle": avg("time/engine_idle"), "staleness": avg("staleness/mean"),
            "acc_start": summary["eval_start"].get("eval/accuracy"), "acc_final": summary["eval_final"].get("eval/accuracy"),
            "train_acc_last": _mean([r.get("accuracy", float("nan")) for r in steps[-3:]]),
            "grpo_wall": sum(r["time/step"] for r in steps)}


def _versions() -> str:
    import ray
    import torch
    import vllm

    return f"Python {platform.python_version()}, torch {torch.__version__}, vLLM {vllm.__version__}, Ray {ray.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/arith_cpu.yaml")
    ap.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--time-budget", type=float, default=None, help="time_budget_s of every GRPO run (s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every bound once per seed (config `seed`), all from the same cold start; the table then "
                    "adds the spread of the held-out gain per bound")
    ap.add_argument("--name", default="demo")
    ap.add_argument("--out", default=None, help="results file (default bench/results/pipeline_<name>.md)")
    ap.add_argument("--keep", default=None, help="keep the runs in this folder (default: a temporary one)")
    ap.add_argument("--init", default=None, help="a cold-start checkpoint (HF dir) to start every run from, "
                    "instead of making one (e.g. <run>/checkpoints/sft of an earlier `steps=0` run of the config)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = ap.parse_args(argv)
    out_md = Path(args.out or REPO / "bench" / "results" / f"pipeline_{args.name}.md")
    root = Path(args.keep or tempfile.mkdtemp(prefix="troupe-bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    common = [f"steps={args.steps}", "eval_every=0", "tensorboard=false", *args.overrides]
    if args.time_budget:
        common.append(f"time_budget_s={args.time_budget}")

    if args.init:
        model, sft_s = Path(args.init).resolve(), None
        if not (model / "config.json").exists():
            raise SystemExit(f"--init {args.init}: no config.json there (not a Hugging Face model folder)")
    else:
        sft_dir, sft_s = _train(args.config, root, "sft", [*args.overrides, "steps=0", "tensorboard=false"])
        model = sft_dir / "checkpoints" / "sft"
        if not model.exists():  # a config without cold start: every run starts from the config's model
            model = None
        print(f"cold start: {sft_s:.0f} s -> {model}", flush=True)
    rows = []
    for seed in args.seeds or [None]:
        for n in args.staleness:
            extra = [f"rollout.max_staleness={n}"] + ([f"model.path={model}", "sft.enabled=false"] if model else [])
            extra += [f"seed={seed}"] if seed is not None else []
            name = f"staleness{n}" + (f"_seed{seed}" if seed is not None else "")
            run_dir, wall = _train(args.config, root, name, common + extra)
            row = {"n": n, "seed": seed, **summarize(run_dir), "process": wall}
            rows.append(row)
            print(json.dumps(row), flush=True)

    cmd = "python bench/bench_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Synchronous vs pipelined GRPO: {args.name}", "",
             f"Generated by `{cmd}` on {_dt.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, {_versions()}. Config `{args.config}`; overrides {common}. "
             "Every run starts from the same cold-start SFT checkpoint ("
             + (f"{sft_s:.0f} s to make" if sft_s is not None else f"`--init {args.init}`") + "). Times are means over "
             "the steps after the first, in seconds; rollout = generate + reward wait; step / max = step time over "
             "max(rollout, learn) measured in the same run.", "",
             "| max_staleness | seed | ratio's old policy (algo.old_logp) | steps | step s | rollout s | learn s | sync s | step / max(rollout, learn) | learner idle s "
             "| engine idle s | mean staleness | held-out acc start -> final | sampled acc (last 3 steps) | GRPO wall s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['seed'] if r['seed'] is not None else '-'} | {r['old_logp']} | {r['steps']} | {r['step']:.2f} | {r['rollout']:.2f} | {r['learn']:.2f} | {r['sync']:.2f} "
                     f"| {r['ratio']:.2f}x | {r['learner_idle']:.2f} | {r['engine_idle']:.2f} | {r['staleness']:.2f} "
                     f"| {r['acc_start']:.3f} -> {r['acc_final']:.3f} | {r['train_acc_last']:.3f} | {r['grpo_wall']:.0f} |")
    if args.seeds:
        lines += ["", "Held-out gain (final - start) per bound over the seeds:", "",
                  "| max_staleness | seeds | gain min | gain mean | gain max | runs with gain >= 0.05 |", "|---:|---:|---:|---:|---:|---:|"]
        for n in args.staleness:
            gains = [r["acc_final"] - r["acc_start"] for r in rows if r["n"] == n]
            lines.append(f"| {n} | {len(gains)} | {min(gains):+.3f} | {_mean(gains):+.3f} | {max(gains):+.3f} "
                         f"| {sum(g >= 0.05 for g in gains)} of {len(gains)} |")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    print(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
