"""Weight sync: speed against a plain memcpy of the same bytes, and the sender's memory under ZeRO-3.

What it measures (one machine, real Ray, one real vLLM CPU engine, real DeepSpeed ZeRO over gloo):

1. Speed, for a builtin-style Qwen2 of 122M parameters (hidden 1024, 8 layers, MLP 4096, float32:
   489 MB on the wire with the tied LM head sent twice), learner ZeRO-2 on one rank and ZeRO-3 on
   two ranks: seconds per sync (median of ``--repeats`` after one warm-up) and GB/s for

   * ``legacy``: the sync before this change (rank 0 gathers the whole model, writes one
     safetensors file to /dev/shm; the engine reloads it in one call),
   * ``shm`` with 256 MiB and 64 MiB buckets (raw bytes into /dev/shm: under ZeRO-3 every rank
     writes its own partitions, no gather; the engine maps the pages and reloads bucket by bucket
     while the next bucket is written),
   * ``object_store`` with 256 MiB buckets (rank 0 gathers one bucket at a time and ``ray.put``s it),

   against a one-thread ``numpy.copyto`` of the same number of bytes in the driver (best of 5),
   with the time split: sender (until the last bucket is written), rank 0's writes alone, the
   engine's bucket loads (vLLM's ``reload_weights``: copy into the layer, oneDNN repacking). After
   the last sync of each row, the largest engine/learner log-prob difference on a fixed sequence.
2. Memory of the sender under ZeRO-3 (two ranks, no engine, 64 MiB buckets): rank 0's peak resident
   size growth during a sync (kernel VmHWM, heap trimmed and peak reset before), and the
   whole-parameter bytes a rank held, for three model sizes (2, 4, 8 layers): the bucketed sync
   with partition writes (shm), the bucketed sync with per-bucket gathers (rank 0 writes the file),
   and a whole-model gather (the legacy ``save_weights``).

Usage::

    python bench/bench_sync.py [--quick] [--out bench/results/weight_sync.md]

Writes a markdown report to ``--out`` and prints it. About 6-8 minutes on 2 shared cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch

from troupe.cluster.learners import LearnerGroup
from troupe.cluster.weight_sync import WeightSync, _FileSink
from troupe.configs.schema import RolloutConfig, load_config
from troupe.core.types import Group, Prompt, Sample
from troupe.core.weights import layout_bytes
from troupe.learner.batch import collate_groups
from troupe.learner.tiny_model import build_tiny_model
from troupe.learner.zero import LearnerRank
from troupe.rollout.engine import RolloutEngine
from troupe.rollout.engine_group import EngineGroup

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, num_heads=8, num_kv_heads=2, intermediate_size=4096)
CORPUS = ["0123456789+=<think></think><answer></answer> Compute the sum, carry the one."] * 40
MB = 2**20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Best time of a one-thread numpy.copyto of ``nbytes`` bytes (both buffers touched first)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return best


def start_learners(model: str, stage: int, ranks: int) -> tuple[LearnerGroup, int]:
    """``ranks`` LearnerRank actors (ZeRO ``stage``, gloo), ready; and the model's parameter count."""
    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", [
        f"model.path={model}", "sft.enabled=false", f"learner.zero_stage={stage}", f"learner.num_ranks={ranks}",
        "learner.micro_batch_size=4", "rollout.prompts_per_step=2", "rollout.group_size=4", "learner.lr=0.001"])
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}}
    port = _port()
    rank = ray.remote(LearnerRank).options(num_cpus=1, runtime_env=env)
    group = LearnerGroup([rank.remote(r, ranks, "127.0.0.1", port, model, cfg) for r in range(ranks)])
    return group, group.ready()[0]["params"]


def train_once(learners: LearnerGroup) -> None:
    """One GRPO step on a made-up batch, so that the weights differ from the engine's."""
    g = torch.Generator().manual_seed(0)
    groups = [Group(Prompt(k, "", [7, 8, 9], "q", "1"),
                    [Sample(torch.randint(5, 60, (6,), generator=g).tolist(), [-3.0] * 6, "", False, 0) for _ in range(4)],
                    rewards=[1.0, 0.0, 0.5, 0.0]) for k in range(2)]
    learners.train_step(collate_groups(groups, pad_id=0))


def max_diff(learners: LearnerGroup, engines: EngineGroup, probe: list[int]) -> float:
    lrn = learners.sequence_logprobs(probe, 3)
    return max(abs(a - b) for a, b in zip(engines.sequence_logprobs(probe, 3)[0], lrn))


class Versions:
    """Policy versions handed out in order (every sync of the benchmark is a new version)."""

    def __init__(self) -> None:
        self.v = 0

    def next(self) -> int:
        self.v += 1
        return self.v


def time_strategy(learners, engines, strategy: str, bucket_mb: float, repeats: int, versions: Versions) -> dict:
    """One warm-up sync, then ``repeats`` timed ones: medians of the sync's own timings."""
    sync = WeightSync(learners, engines, strategy, True, bucket_mb=bucket_mb)
    try:
        sync.sync(versions.next())
        outs = [sync.sync(versions.next()) for _ in range(repeats)]
    finally:
        sync.close()
    med = lambda k: statistics.median(o[k] for o in outs)  # noqa: E731
    return {"seconds": med("sync_seconds"), "send": med("sync_send_seconds"), "put": med("sync_put_seconds"),
            "engine": med("sync_engine_load_seconds"), "buckets": outs[0]["sync_buckets"], "bytes": outs[0]["sync_bytes"],
            "held_mb": max(o["sync_held_mb"] for o in outs)}


def time_legacy(learners, engines, repeats: int, versions: Versions) -> dict:
    """The sync before this change: whole-model gather + safetensors in /dev/shm, one engine reload."""
    d = tempfile.mkdtemp(prefix="bench-sync-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = os.path.join(d, "policy.safetensors")
    rows = []
    try:
        for i in range(repeats + 1):
            t0 = time.time()
            learners.save_weights(path)
            t1 = time.time()
            res = engines.load_weights(path, versions.next())
            rows.append((time.time() - t0, t1 - t0, res[0]["seconds"]))
            os.remove(path)
    finally:
        os.rmdir(d)
    rows = rows[1:]
    return {"seconds": statistics.median(r[0] for r in rows), "send": statistics.median(r[1] for r in rows),
            "put": float("nan"), "engine": statistics.median(r[2] for r in rows), "buckets": 1, "held_mb": float("nan")}


def speed(model: str, repeats: int, quick: bool) -> tuple[list[dict], float, int]:
    """Part 1: rows of the speed table, the memcpy seconds, the bytes per sync."""
    versions = Versions()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"}
    engine = ray.remote(RolloutEngine).options(num_cpus=1, runtime_env={"env_vars": env})
    engines = EngineGroup([engine.remote(model, RolloutConfig(max_model_len=256), dtype="float32", seed=0)],
                          rpc_timeout_s=900)
    engines.ready()
    probe = [7, 8, 9] + torch.randint(5, 60, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    rows, nbytes = [], 0
    setups = [(2, 1)] if quick else [(2, 1), (3, 2)]
    try:
        for stage, ranks in setups:
            learners, _ = start_learners(model, stage, ranks)
            try:
                nbytes = layout_bytes(learners.weight_buckets(256 * MB))
                train_once(learners)
                plan = [("legacy", None), ("shm", 256), ("shm", 64), ("object_store", 256)]
                for strategy, bucket in plan:
                    print(f"[bench] ZeRO-{stage} x{ranks}: {strategy} {bucket} ...", flush=True)
                    if strategy == "legacy":
                        r = time_legacy(learners, engines, repeats, versions)
                    else:
                        r = time_strategy(learners, engines, strategy, bucket, repeats, versions)
                    r.update(stage=stage, ranks=ranks, strategy=strategy, bucket=bucket,
                             diff=max_diff(learners, engines, probe))
                    rows.append(r)
            finally:
                learners.shutdown()
    finally:
        engines.shutdown()
    return rows, memcpy_seconds(nbytes), nbytes


def memory(layers: list[int], bucket_mb: float, tmp: Path) -> list[dict]:
    """Part 2: rank 0's peak RSS growth during a sync, per model size (ZeRO-3, two ranks, no engine)."""
    rows = []
    for n in layers:
        model = build_tiny_model(str(tmp / f"m{n}"), CORPUS, num_layers=n, **SHAPE)
        learners, params = start_learners(model, 3, 2)
        try:
            bb = int(bucket_mb * MB)
            buckets = learners.weight_buckets(bb)
            size = layout_bytes(buckets)
            path = str(tmp / f"w{n}.bin") if not os.path.isdir("/dev/shm") else f"/dev/shm/bench-sync-{os.getpid()}-{n}.bin"
            row = {"layers": n, "params": params, "bytes": size,
                   "buckets": len(buckets), "largest_bucket": max(b.nbytes for b in buckets)}
            try:
                for label, partitioned in (("partitions", True), ("gathered", False)):
                    learners.open_weight_sink(_FileSink(path, size, partitioned=partitioned))
                    list(learners.send_weight_buckets(len(buckets), bb))  # warm-up: the file's pages exist
                    before = learners.peak_memory(reset=True)[0]
                    outs = list(learners.send_weight_buckets(len(buckets), bb))
                    row[label] = learners.peak_memory()[0]["peak"] - before["rss"]
                    row[label + "_held"] = max(o["held_bytes"] for o in outs)
                before = learners.peak_memory(reset=True)[0]
                learners.save_weights(path + ".safetensors")
                row["full"] = learners.peak_memory()[0]["peak"] - before["rss"]
            finally:
                for p in (path, path + ".safetensors"):
                    if os.path.exists(p):
                        os.remove(p)
            rows.append(row)
            print(f"[bench] memory {row}", flush=True)
        finally:
            learners.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write and print the markdown report. Returns 0."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, ZeRO-2 only, one memory size (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "weight_sync.md"))
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs per row (after one warm-up)")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        tmp = Path(tmp)
        layers = 2 if args.quick else 8
        model = build_tiny_model(str(tmp / "model"), CORPUS, num_layers=layers, **SHAPE)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            rows, memcpy, nbytes = speed(model, args.repeats, args.quick)
            mem = memory([2] if args.quick else [2, 4, 8], 64, tmp)
        finally:
            ray.shutdown()
    text = _report(args, rows, memcpy, nbytes, mem, load_before, os.getloadavg()[0], time.time() - t_start)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


def _versions() -> str:
    import deepspeed
    import vllm

    return f"torch {torch.__version__}, vLLM {vllm.__version__}, DeepSpeed {deepspeed.__version__}, Ray {ray.__version__}"


def _report(args, rows: list[dict], memcpy: float, nbytes: int, mem: list[dict], load_before: float,
            load_after: float, seconds: float) -> str:
    gbps = lambda s: nbytes / s / 1e9  # noqa: E731
    params = nbytes / 4 / 1e6
    lines = [
        "# Weight sync: speed and the sender's memory",
        "",
        f"Generated by `bench/bench_sync.py{' --quick' if args.quick else ''}` on "
        f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} in {seconds / 60:.1f} min; {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, {_versions()}. One vLLM CPU engine "
        "(1 CPU, OMP_NUM_THREADS=1), learner ranks of 1 CPU each, all on one node. 1-minute load average "
        f"{load_before:.1f} before and {load_after:.1f} after (other jobs shared the machine: timings are noisy).",
        "",
        f"## Speed: {params:.0f}M parameters, {nbytes / 1e6:.0f} MB per sync (float32)",
        "",
        f"One-thread memcpy of the same bytes (`numpy.copyto`, best of 5): {memcpy:.3f} s = "
        f"**{gbps(memcpy):.1f} GB/s**. Sync times are medians of {args.repeats} syncs after a warm-up; "
        "\"sender\" is until the last bucket was written (under ZeRO-3 with gathers: gather + write), "
        "\"writes\" rank 0's time inside the sink (shm: `pwrite` into /dev/shm; object_store: `ray.put`), "
        "\"engine\" the engine's time inside its bucket loads (vLLM's `reload_weights`; legacy: safetensors "
        "load + reload). Max diff: engine vs learner log-prob on a fixed 43-token sequence after the row's "
        "last sync (float32).",
        "",
        "| learner | strategy | bucket | buckets | sync s | GB/s | % of memcpy | sender s | writes s | engine s | max diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        put = "-" if r["put"] != r["put"] else f"{r['put']:.3f}"
        bucket = "whole" if r["bucket"] is None else f"{r['bucket']} MiB"
        lines.append(f"| ZeRO-{r['stage']} x{r['ranks']} | {r['strategy']} | {bucket} | {r['buckets']} | "
                     f"{r['seconds']:.3f} | {gbps(r['seconds']):.2f} | {100 * memcpy / r['seconds']:.0f}% | "
                     f"{r['send']:.3f} | {put} | {r['engine']:.3f} | {r['diff']:.1e} |")
    lines += [
        "",
        "## The sender's memory under ZeRO-3 (2 ranks, 64 MiB buckets)",
        "",
        "Growth of learner rank 0's peak resident size during one sync (kernel VmHWM; glibc heap trimmed and "
        "the peak reset just before; the file's pages already exist), and the most bytes of whole "
        "(un-partitioned) parameters a rank held meanwhile (counted on the module).",
        "",
        "| layers | params | model MB | buckets (largest MB) | partition writes: RSS growth MB (held MB) | "
        "bucket gathers: RSS growth MB (held MB) | whole-model gather (legacy): RSS growth MB |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for m in mem:
        lines.append(f"| {m['layers']} | {m['params'] / 1e6:.0f}M | {m['bytes'] / 1e6:.0f} | {m['buckets']} "
                     f"({m['largest_bucket'] / 1e6:.0f}) | {m['partitions'] / 1e6:.0f} ({m['partitions_held'] / 1e6:.0f}) | "
                     f"{m['gathered'] / 1e6:.0f} ({m['gathered_held'] / 1e6:.0f}) | {m['full'] / 1e6:.0f} |")
    lines += ["", "## Reading", "", "(written by hand after the run)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
