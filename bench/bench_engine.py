"""Engine throughput (generated tokens/s): troupe's vLLM CPU engine against Hugging Face ``generate``.

The same randomly initialised Qwen2 models, built locally (``troupe.learner.tiny_model``), at two
sizes (``--models``: ``1m`` = hidden 128, 4 layers, 1.03M parameters; ``25m`` = hidden 512, 7
layers, 26.8M), the same batches of arithmetic-demo prompts (~20 tokens each, one sample each),
the same response cap, float32, sampling at temperature 1 (no top-k/top-p). Both stop a response
at EOS; tokens/s counts the response tokens actually generated (EOS included), so a batch that
finishes early is not credited with tokens it did not make (HF keeps computing finished rows until
the whole batch is done; vLLM drops them). Points (``--points``): prompts x max new tokens.

Engines:

* ``hf``: ``AutoModelForCausalLM.generate`` in this process, left-padded batch, KV cache,
  ``torch.set_num_threads(--threads)``.
* ``troupe``: ``troupe.rollout.engine.RolloutEngine`` in this process, started with the thread
  environment troupe gives an engine that reserves ``--threads`` CPUs
  (``troupe.cluster.runtime.thread_env``: ``OMP/MKL/OPENBLAS_NUM_THREADS``, unbound) and troupe's
  engine settings (eager mode, prefix caching, no chunked prefill, ``processed_logprobs``), called
  as training calls it: ``generate(prompts, Sampling, seeds)`` with one seed per prompt and the
  sampled tokens' log-probs, returning troupe ``Group`` records.
* ``troupe unseeded``: the same call with ``seeds=None`` (one ``SamplingParams`` for the batch, the
  engine's own RNG stream): what the per-prompt seeds cost (vLLM 0.32 draws the noise of a request
  that has its own generator one request at a time, ``vllm/v1/sample/ops/topk_topp_sampler.py``
  ``random_sample``).
* ``vllm call``: the same engine object, but one plain ``LLM.generate`` call (one
  ``SamplingParams`` without a seed, so no per-request generators; no log-probs; vLLM's outputs,
  not troupe records): what troupe's per-call choices cost.
* ``vllm defaults`` (``--vllm-defaults``): a plain ``vllm.LLM`` with vLLM's own settings (its
  core binding ``VLLM_CPU_OMP_THREADS_BIND=auto``, chunked prefill, no thread variables set) except
  ``enforce_eager=True`` (as troupe's default ``rollout.enforce_eager``; graph compilation not timed
  here), the plain call.

Each point is timed at least ``--repeats`` times after a small warm-up (short points up to 10 times,
while the runs add up to under 3 s); the wall-clock table gives the fastest run (on a shared
machine other jobs only add time), the CPU table tokens per CPU-second over all runs. The vLLM columns include a worker process and a
scheduler process besides the ``--threads`` compute threads; HF runs in one process.

Usage::

    python bench/bench_engine.py [--models 1m,25m] [--points 8x8,8x128,128x8,128x128] [--repeats 2]
                                 [--threads 1] [--vllm-defaults] [--out bench/results/engine_throughput.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # name -> build_tiny_model shape
    "1m": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "25m": dict(hidden_size=512, num_layers=7, num_heads=8, num_kv_heads=2, intermediate_size=2048),
}
THREAD_VARS_CLEARED = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_PROC_BIND",
                       "VLLM_CPU_OMP_THREADS_BIND")


def _build(root: str, name: str) -> tuple[str, int]:
    """Build model ``name`` under ``root``; (folder, parameter count)."""
    from troupe.demo import arith
    from troupe.learner.tiny_model import build_tiny_model

    rows = arith.arith_rows(400, 0, 99, "train")
    corpus = [arith.PROMPT_FORMAT.format(question=r["question"]) for r in rows] + [arith.worked_solution(r) for r in rows]
    path = build_tiny_model(f"{root}/{name}", corpus, max_position_embeddings=512, seed=0, **MODELS[name])
    return path, json.loads(Path(path, "troupe_tiny_model.json").read_text())["params"]


def _prompts(model: str, n: int):
    """``n`` arithmetic-demo prompts (troupe ``Prompt`` records), tokenized for ``model``."""
    from transformers import AutoTokenizer

    from troupe.demo import arith
    from troupe.rollout.prompts import build_prompts

    tok = AutoTokenizer.from_pretrained(model)
    prompts, _ = build_prompts(arith.arith_rows(n, 0, 99, "eval"), tok, template="raw", prompt_format=arith.PROMPT_FORMAT,
                               system_prompt=None, max_prompt_tokens=64)
    assert len(prompts) == n, (len(prompts), n)
    return prompts


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and every live descendant (vLLM's
    engine-core and worker processes)."""
    import psutil

    me, total = psutil.Process(), 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # ended meanwhile
            pass
    return total


def _best(fn, repeats: int, min_seconds: float = 3.0, max_runs: int = 10) -> tuple[float, int, float]:
    """Several calls of ``fn() -> tokens`` (at least ``repeats``, more, up to ``max_runs``, while they add
    up to less than ``min_seconds``: short points get more tries). Returns the fastest call's wall
    seconds and tokens, and the CPU seconds per token over all the calls (:func:`_cpu_seconds`,
    which counts in clock ticks: summed over calls, the rounding of short calls averages out)."""
    best, spent, runs, tokens, cpu = (float("inf"), 0), 0.0, 0, 0, 0.0
    while runs < repeats or (spent < min_seconds and runs < max_runs):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        n = fn()
        t, c = time.perf_counter() - t0, _cpu_seconds() - c0
        spent, runs, tokens, cpu = spent + t, runs + 1, tokens + n, cpu + c
        if t < best[0]:
            best = (t, n)
    return best[0], best[1], cpu / max(tokens, 1)


def _hf(model: str, points: list[tuple[int, int]], prompts, repeats: int) -> dict:
    """{(prompts, tokens): (seconds, tokens, CPU seconds per token)} for HF generate (:func:`_best`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def run(n: int, new: int) -> int:
        ids = [p.token_ids for p in prompts[:n]]
        width = max(len(x) for x in ids)
        inp = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        with torch.no_grad():
            out = m.generate(input_ids=inp, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new, eos_token_id=eos, pad_token_id=pad)
        tokens = 0
        for row in out[:, width:].tolist():
            tokens += row.index(eos) + 1 if eos in row else len(row)
        return tokens

    torch.manual_seed(0)
    run(4, 8)  # warm-up
    return {(n, new): _best(lambda: run(n, new), repeats) for n, new in points}


def _free(llm) -> None:
    """Shut a ``vllm.LLM`` down (its engine-core and worker processes) before the next one starts."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # older/newer layouts: dropping the object ends the processes too
        pass
    del llm
    gc.collect()


def _vllm(model: str, points: list[tuple[int, int]], prompts, repeats: int, threads: int, defaults: bool) -> dict:
    """{"troupe" | "troupe unseeded" | "vllm call" | "vllm defaults": {(prompts, tokens): (seconds, tokens, CPU
    seconds per token)}} (:func:`_best`)."""
    from vllm import LLM, SamplingParams

    from troupe.cluster.runtime import thread_env
    from troupe.configs.schema import RolloutConfig, load_config
    from troupe.core.types import Sampling
    from troupe.rollout.engine import RolloutEngine

    def plain(llm, n: int, new: int) -> int:
        sp = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=new)  # the engine's own RNG stream
        outs = llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts[:n]], sp, use_tqdm=False)
        return sum(len(c.token_ids) for o in outs for c in o.outputs)

    saved = {k: os.environ.get(k) for k in (*THREAD_VARS_CLEARED, "VLLM_CPU_KVCACHE_SPACE")}
    results = {}
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "arith_cpu.yaml",
                      [f"rollout.num_cpus_per_engine={threads}"])
    try:
        os.environ.update(thread_env("engine", cfg), VLLM_CPU_KVCACHE_SPACE="1")
        # vLLM's own processes, as when engine_throughput.md was measured (the CPU default is now in-process:
        # bench/bench_engine_start.py)
        engine = RolloutEngine(model, RolloutConfig(max_model_len=512, kv_cache_gib=1, engine_core="subprocess"),
                               dtype="float32", seed=0)

        def troupe(n: int, new: int, seeded: bool = True) -> int:
            groups = engine.generate(prompts[:n], Sampling(n=1, max_new_tokens=new, temperature=1.0),
                                     seeds=[1000 + i for i in range(n)] if seeded else None)
            return sum(len(s.response_ids) for g in groups for s in g.samples)

        troupe(4, 8)
        results["troupe"] = {(n, new): _best(lambda: troupe(n, new), repeats) for n, new in points}
        results["troupe unseeded"] = {(n, new): _best(lambda: troupe(n, new, False), repeats) for n, new in points}
        results["vllm call"] = {(n, new): _best(lambda: plain(engine.llm, n, new), repeats) for n, new in points}
        _free(engine.llm)
        engine = None  # drop the last reference: the engine and its memory go before the next one starts
        if defaults:
            for k in THREAD_VARS_CLEARED:
                os.environ.pop(k, None)
            llm = LLM(model=model, dtype="float32", max_model_len=512, seed=0, enforce_eager=True)
            plain(llm, 4, 8)
            results["vllm defaults"] = {(n, new): _best(lambda: plain(llm, n, new), repeats) for n, new in points}
            _free(llm)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="1m,25m", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--points", default="8x8,8x128,128x8,128x128", help="prompts x max new tokens, comma-separated")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="compute threads of each engine (HF: torch threads; "
                                                             "troupe: rollout.num_cpus_per_engine)")
    ap.add_argument("--vllm-defaults", action="store_true", help="also time a vLLM engine with vLLM's own settings")
    ap.add_argument("--out", default="bench/results/engine_throughput.md")
    args = ap.parse_args()
    names = args.models.split(",")
    if bad := [n for n in names if n not in MODELS]:
        ap.error(f"--models: unknown {bad}; known {sorted(MODELS)}")
    try:
        points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
        assert all(len(p) == 2 and min(p) > 0 for p in points)
    except (ValueError, AssertionError):
        ap.error(f"--points: expected e.g. 8x8,128x128, got {args.points!r}")

    import torch
    import transformers
    import vllm

    torch.set_num_threads(args.threads)
    load0, t_start = os.getloadavg()[0], time.time()
    tmp = tempfile.TemporaryDirectory()
    rows = []
    for name in names:
        model, params = _build(tmp.name, name)
        prompts = _prompts(model, max(n for n, _ in points))
        timings = {"hf": _hf(model, points, prompts, args.repeats),
                   **_vllm(model, points, prompts, args.repeats, args.threads, args.vllm_defaults)}
        for n, new in points:
            rows.append((name, params, n, new, {k: v[(n, new)] for k, v in timings.items()}))
            print(name, n, new, {k: (round(sec, 3), tok, round(1 / max(cpu, 1e-9))) for k, (sec, tok, cpu) in
                                 rows[-1][4].items()}, flush=True)
    minutes = (time.time() - t_start) / 60
    engines = [k for k in ("hf", "troupe", "troupe unseeded", "vllm call", "vllm defaults") if k in rows[0][4]]
    head = "| model | parameters | prompts | max new tokens | " + " | ".join(engines) + " | troupe / hf |"
    rule = "|---|---:|---:|---:|" + "---:|" * len(engines) + "---:|"

    def table(metric) -> list[str]:
        out = [head, rule]
        for name, params, n, new, t in rows:
            v = {e: metric(*t[e]) for e in engines}
            out.append(f"| {name} | {params / 1e6:.2f}M | {n} | {new} | " + " | ".join(f"{v[e]:,.0f}" for e in engines)
                       + f" | {v['troupe'] / v['hf']:.2f}x |")
        return out

    lines = [
        "# Engine throughput: troupe's vLLM CPU engine vs Hugging Face generate",
        "",
        f"Generated by `python bench/bench_engine.py {' '.join(sys.argv[1:])}` on {_dt.datetime.now():%Y-%m-%d %H:%M} "
        f"in {minutes:.1f} min; {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, vLLM {vllm.__version__}; "
        f"{args.threads} compute thread(s) per engine; float32, temperature 1, one sample per prompt, fastest of "
        f"at least {args.repeats} runs (up to 10 while under 3 s in all). 1-minute load average {load0:.1f} before "
        f"the run and {os.getloadavg()[0]:.1f} after (other jobs share this machine). Tokens are the response tokens "
        "generated, EOS included (the script's docstring). Engines: `hf` = transformers `generate`; `troupe` = "
        "`RolloutEngine.generate` as training calls it (one seed per prompt, log-probs, troupe records); `troupe "
        "unseeded` = the same without per-prompt seeds; `vllm call` = the same engine, one plain `LLM.generate` call"
        + (", `vllm defaults` = a plain `vllm.LLM` with vLLM's own settings (eager)" if "vllm defaults" in engines
           else "") + ".",
        "",
        "Generated tokens per second (wall clock):",
        "",
        *table(lambda sec, tok, cpu: tok / sec),
        "",
        "Generated tokens per CPU-second, over all the runs of a point (user + system time of the engine's "
        "processes: this process, and vLLM's engine-core and worker processes; less sensitive to other jobs on the "
        "machine than wall time, but it counts time spent spinning while waiting for a core):",
        "",
        *table(lambda sec, tok, cpu_per_token: 1.0 / max(cpu_per_token, 1e-9)),
        "",
        "| model | prompts | max new tokens | tokens generated (hf, troupe) |",
        "|---|---:|---:|---|",
        *[f"| {name} | {n} | {new} | {t['hf'][1]}, {t['troupe'][1]} |" for name, _, n, new, t in rows],
    ]
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
