"""vLLM's engine core in the engine actor or in its own processes (``rollout.engine_core``) on the CPU.

Each trial is a fresh Python process that builds one ``troupe.rollout.engine.RolloutEngine`` on the
demo's tiny model (``troupe.learner.tiny_model``, hidden 128, 2 layers, the arithmetic corpus) with
the thread environment a run gives an engine with one CPU, then samples the demo's step batch (64
prompts x G=8, 40 new tokens, per-prompt seeds) three times. It reports the seconds to import vLLM, to
start the engine (``LLM(...)``: with ``subprocess`` that spawns vLLM's EngineCore and worker processes,
each of which imports torch and vLLM again) and the fastest of the three generate calls. Trials of the
two modes alternate, so a busy period of the shared machine hits both.

Usage::

    python bench/bench_engine_start.py [--trials 3] [--out bench/results/engine_start.md]
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

REPO = Path(__file__).resolve().parents[1]
MODES = ("in_process", "subprocess")

TRIAL = r"""
import json, os, sys, time
t0 = time.time()
from troupe.configs.schema import RolloutConfig
from troupe.core.types import Sampling
from troupe.demo import arith
from troupe.rollout.engine import RolloutEngine
from troupe.rollout.prompts import build_prompts
import vllm  # noqa: F401
t1 = time.time()
engine = RolloutEngine(sys.argv[1], RolloutConfig(max_model_len=256, engine_core=sys.argv[2]))
t2 = time.time()
prompts, _ = build_prompts(arith.arith_rows(64, 10, 99, "eval"), engine.tokenizer, template="raw",
                           prompt_format=arith.PROMPT_FORMAT, system_prompt=None, max_prompt_tokens=64)
sampling = Sampling(n=8, max_new_tokens=40, temperature=1.0)
times = []
for _ in range(3):
    t = time.time()
    groups = engine.generate(prompts, sampling, [16 * i for i in range(len(prompts))])
    times.append(time.time() - t)
tokens = sum(len(s.response_ids) for g in groups for s in g.samples)
print("RESULT", json.dumps({"import_s": t1 - t0, "start_s": t2 - t1, "generate_s": min(times), "tokens": tokens}))
"""


def trial(model_dir: str, mode: str) -> dict:
    """One fresh process: import, start, generate; raises SystemExit with its output if it fails."""
    from troupe.core.threads import cpu_thread_env

    env = {**os.environ, **cpu_thread_env(1), "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_LOGGING_LEVEL": "ERROR"}
    r = subprocess.run([sys.executable, "-c", TRIAL, model_dir, mode], env=env, capture_output=True, text=True,
                       cwd=REPO, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"trial {mode} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "engine_start.md"))
    args = ap.parse_args()

    from troupe.demo import arith
    from troupe.learner.tiny_model import build_tiny_model

    t_all = time.time()
    rows = arith.arith_rows(200, 10, 99, "train")
    corpus = [arith.PROMPT_FORMAT.format(question=r["question"]) for r in rows] + [arith.worked_solution(r) for r in rows]
    model_dir = build_tiny_model(str(Path(tempfile.mkdtemp(prefix="bench-engine-start-")) / "model"), corpus)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(args.trials):
        for mode in (MODES if i % 2 == 0 else MODES[::-1]):
            results[mode].append(trial(model_dir, mode))
            print(mode, results[mode][-1], flush=True)

    def cell(mode: str, key: str) -> str:
        xs = [r[key] for r in results[mode]]
        return f"{min(xs):.1f} / {sum(xs) / len(xs):.1f}"

    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        "# vLLM engine start on the CPU: engine core in the actor vs in its own processes",
        "",
        f"`python bench/bench_engine_start.py --trials {args.trials}` at {commit}, "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {time.time() - t_all:.0f} s; "
        f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"vLLM {vllm.__version__}. The demo's tiny model (hidden 128, 2 layers), one engine with the thread "
        "environment of a 1-CPU engine; generate = the demo's step batch, 64 prompts x G=8, 40 new tokens, "
        f"per-prompt seeds, fastest of 3 calls ({results[MODES[0]][0]['tokens']} tokens). Each cell: fastest / mean "
        f"of {args.trials} fresh processes.",
        "",
        "| rollout.engine_core | import vLLM (s) | start engine (s) | generate (s) |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        lines.append(f"| {mode} | {cell(mode, 'import_s')} | {cell(mode, 'start_s')} | {cell(mode, 'generate_s')} |")
    ratio = (sum(r["start_s"] for r in results["subprocess"]) / sum(r["start_s"] for r in results["in_process"]))
    gen = (sum(r["generate_s"] for r in results["subprocess"]) / sum(r["generate_s"] for r in results["in_process"]))
    lines += ["", f"Start: subprocess / in_process = {ratio:.1f}x (means). Generate: subprocess / in_process = "
              f"{gen:.2f}x (means).", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
