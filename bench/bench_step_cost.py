"""The learner's fixed cost per step, and the padding that token-budget micro-batches save.

What it measures (local machine, real Ray, real DeepSpeed ZeRO-2 learner ranks over gloo, no GPU).
Every comparison is paired: the variants' learner groups run side by side in one Ray cluster and
are stepped in turn, so that other jobs on the machine load them alike. ``--baseline REV`` adds
the code of git revision REV as one more variant: a temporary git worktree whose packages the
baseline's rank actors import (their PYTHONPATH), driven as that revision's ``LearnerGroup`` drove
them (``ray.put`` of the batch, one call per rank); its ranks report no time breakdown.

1. Fixed cost: a tiny step batch (2 prompts x G=2, prompts of 16 tokens, responses of 8-20) on the
   demo's model shape (Qwen2, hidden 128, 2 layers, 0.53 M parameters), 1 and 2 learner ranks,
   with and without a reference model (KL in the loss). Per step: the driver's wall time of
   ``LearnerGroup.train_step`` (sending the batch, one call per rank, the ranks' work, merging the
   metrics) and the ranks' own parts (old log-prob forward, reference forward, update); "driver +
   RPC" is the wall time minus the ranks' mean ``learn_seconds``; "no-op call" is a call to every
   rank that does nothing. Variants: REV; ``learner.skip_old_forward: false`` (a separate no-grad
   forward for the old log-probs, as before); the default (they come from the training forward),
   twice: the two identical groups show how far apart the same work lands on this machine.
2. Driver-side pieces, timed alone: collating the demo's step (64 prompts x G=8, 40-token
   responses: Python lists of ids and log-probs -> tensors), ``ray.put`` of that batch, and sending
   the tiny batch to bare actors put-once-and-reference (as before) vs by value (now, for batches
   under ``troupe.cluster.learners.INLINE_BATCH_BYTES``), alternated.
3. Padding: a step with long-tailed response lengths (16 prompts x G=8, prompts 12-40 tokens,
   responses log-normal, median ~33, 4-256 tokens), one rank: the padded share of the tokens the
   forward passes run on and the learner time, for fixed micro-batches of 16 rows at the step's
   full width (REV; the share is computed), fixed micro-batches trimmed to their own longest row
   (now), and token-budget micro-batches (``learner.micro_batch_tokens``).

Usage::

    python bench/bench_step_cost.py [--steps 100] [--baseline HEAD] [--out bench/results/step_fixed_cost.md]

Writes a markdown report to ``--out`` and prints it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "demo", "configs", "rollout", "reward", "learner", "cluster")
BREAKDOWN = ("learn/old_logprob_seconds", "learn/ref_logprob_seconds", "learn/update_seconds")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_groups(seed: int = 0):
    """2 prompts x G=2: prompts of 16 tokens, responses of 8, 12, 16, 20 tokens."""
    import torch

    from troupe.core.types import Group, Prompt, Sample

    g = torch.Generator().manual_seed(seed)
    groups = []
    for k in range(2):
        samples = [Sample(torch.randint(5, 200, (n,), generator=g).tolist(), [-5.0] * n, "", False, 0)
                   for n in (8 + 8 * k, 12 + 8 * k)]
        groups.append(Group(Prompt(k, "", torch.randint(5, 200, (16,), generator=g).tolist(), "q", "1"), samples,
                            rewards=[1.0, 0.0]))
    return groups


def long_tail_groups(prompts: int = 16, G: int = 8, seed: int = 0):
    """``prompts`` x G rows, prompts 12-40 tokens, responses log-normal(3.5, 0.6) clipped to 4..256 tokens."""
    import torch

    from troupe.core.types import Group, Prompt, Sample

    g = torch.Generator().manual_seed(seed)
    groups = []
    for k in range(prompts):
        plen = int(torch.randint(12, 41, (1,), generator=g))
        lens = (torch.randn(G, generator=g) * 0.6 + 3.5).exp().round().clamp(4, 256).long().tolist()
        samples = [Sample(torch.randint(5, 200, (n,), generator=g).tolist(), [-5.0] * n, "", False, 0) for n in lens]
        groups.append(Group(Prompt(k, "", torch.randint(5, 200, (plen,), generator=g).tolist(), "q", "1"), samples,
                            rewards=[float(i % 2) for i in range(G)]))
    return groups


def demo_groups(seed: int = 0):
    """The demo's step shape: 64 prompts x G=8, prompts of 30 tokens, responses of 40 (ids and log-prob lists)."""
    import random

    from troupe.core.types import Group, Prompt, Sample

    rng = random.Random(seed)
    return [Group(Prompt(k, "", [rng.randrange(5, 200) for _ in range(30)], "q", "1"),
                  [Sample([rng.randrange(5, 200) for _ in range(40)], [-rng.random() for _ in range(40)], "", False, 0)
                   for _ in range(8)], rewards=[float(i % 2) for i in range(8)]) for k in range(64)]


class _Rank:
    """A learner rank built inside its actor from a config file + overrides, so that a baseline revision's
    ``LearnerRank`` and config schema (imported through the actor's PYTHONPATH) are the ones used."""

    def __init__(self, rank: int, world: int, port: int, model: str, config: str, overrides: list[str]) -> None:
        from troupe.configs.schema import load_config
        from troupe.learner.zero import LearnerRank

        self.rank = LearnerRank(rank, world, "127.0.0.1", port, model, load_config(Path(config), overrides))

    def train_step(self, batch) -> dict:
        return self.rank.train_step(batch)

    def ready(self) -> dict:
        return self.rank.ready()

    def noop(self) -> None:
        return None


class _Variant:
    """One learner group of a comparison: this code (``LearnerGroup``) or a baseline tree (driven as before)."""

    def __init__(self, ray, model: str, ranks: int, overrides: list[str], base: Optional[Path]) -> None:
        from troupe.cluster.learners import LearnerGroup

        self.ray, self.base = ray, base
        env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        if base is not None:
            env["PYTHONPATH"] = str(base)
        config = (base / "troupe" / "configs" if base else REPO / "configs") / "arith_cpu.yaml"
        port = _port()
        R = ray.remote(_Rank).options(num_cpus=0.25, runtime_env={"env_vars": env})
        self.handles = [R.remote(r, ranks, port, model, str(config), [f"learner.num_ranks={ranks}", *overrides])
                        for r in range(ranks)]
        ray.get([h.ready.remote() for h in self.handles])
        self.group = LearnerGroup(self.handles)

    def train_step(self, batch) -> dict:
        if self.base is None:
            return self.group.train_step(batch)
        from troupe.cluster.metrics import mean_dicts

        ref = self.ray.put(batch)  # the baseline's LearnerGroup.train_step
        return mean_dicts(self.ray.get([h.train_step.remote(ref) for h in self.handles]))

    def noop(self) -> None:
        self.ray.get([h.noop.remote() for h in self.handles])

    def shutdown(self) -> None:
        for h in self.handles:
            self.ray.kill(h)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _variants(base: Optional[Path], rev: Optional[str]) -> dict[str, tuple[list[str], Optional[Path]]]:
    out: dict[str, tuple[list[str], Optional[Path]]] = {}
    if base is not None:
        out[f"{rev} (before)"] = ([], base)
    out["now: separate old forward (skip_old_forward=false)"] = (["learner.skip_old_forward=false"], None)
    out["now: old from the training forward (default)"] = ([], None)
    out["now: the same again (twin: the noise floor)"] = ([], None)
    return out


def measure_fixed(ray, model: str, ranks: int, kl: float, variants: dict, steps: int) -> dict:
    """Median per-step times (seconds) over ``steps`` tiny steps after 3 warm-up steps, per variant, the
    variants stepped in turn; and of a no-op call to every rank."""
    from troupe.learner.batch import collate_groups

    batch = collate_groups(tiny_groups(), pad_id=0)
    common = ["rollout.prompts_per_step=2", "rollout.group_size=2", f"algo.kl_coef={kl}", "learner.micro_batch_size=16"]
    groups = {}
    try:
        for name, (extra, base) in variants.items():
            groups[name] = _Variant(ray, model, ranks, common + extra, base)
        rec = {name: {"wall": [], "learn": [], "overhead": [], "noop_call": [], **{k: [] for k in BREAKDOWN}}
               for name in variants}
        for _ in range(3):
            for group in groups.values():
                group.train_step(batch)
        for _ in range(steps):
            for name, group in groups.items():
                t0 = time.perf_counter()
                m = group.train_step(batch)
                wall = time.perf_counter() - t0
                r = rec[name]
                r["wall"].append(wall)
                r["learn"].append(m["learn_seconds"])
                r["overhead"].append(wall - m["learn_seconds"])
                for k in BREAKDOWN:
                    if k in m:
                        r[k].append(m[k])
                t0 = time.perf_counter()
                group.noop()
                r["noop_call"].append(time.perf_counter() - t0)
    finally:
        for group in groups.values():
            group.shutdown()
    return {name: {k: _median(v) for k, v in r.items()} for name, r in rec.items()}


def measure_transport(ray, steps: int) -> dict:
    """Median seconds to send the tiny batch to 1 and 2 actors and get 30 floats back from each: put once and
    pass the reference (as before) vs pass the batch by value (now, for small batches), alternated."""
    from troupe.learner.batch import collate_groups

    @ray.remote(num_cpus=0.5)
    class Echo:
        def take(self, batch) -> dict:
            return {f"k{i}": float(i) for i in range(30)}

    batch = collate_groups(tiny_groups(), pad_id=0)
    actors = [Echo.remote() for _ in range(2)]
    ray.get([a.take.remote(batch) for a in actors])
    out = {}
    try:
        for n in (1, 2):
            put, value = [], []
            for _ in range(3 * steps):
                t0 = time.perf_counter()
                ref = ray.put(batch)
                ray.get([a.take.remote(ref) for a in actors[:n]])
                put.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ray.get([a.take.remote(batch) for a in actors[:n]])
                value.append(time.perf_counter() - t0)
            out[n] = {"put": _median(put), "value": _median(value)}
    finally:
        for a in actors:
            ray.kill(a)
    return out


def measure_padding(ray, model: str, variants: dict, steps: int) -> dict:
    """One rank per variant on the long-tailed batch, stepped in turn: median learner seconds over ``steps``
    steps (after one warm-up) and the rank's padding share and micro-batch count (None from a baseline)."""
    from troupe.learner.batch import collate_groups

    batch = collate_groups(long_tail_groups(), pad_id=0)
    common = ["rollout.prompts_per_step=16", "rollout.group_size=8", "rollout.max_new_tokens=256",
              "rollout.max_model_len=512", "algo.kl_coef=0", "learner.micro_batch_size=16"]
    groups, ms = {}, {name: [] for name in variants}
    try:
        for name, (extra, base) in variants.items():
            groups[name] = _Variant(ray, model, 1, common + extra, base)
        for _ in range(steps + 1):
            for name, group in groups.items():
                ms[name].append(group.train_step(batch))
    finally:
        for group in groups.values():
            group.shutdown()
    return {name: {"learn": _median([m["learn_seconds"] for m in v[1:]]), "padding_frac": v[-1].get("learn/padding_frac"),
                   "micro_batches": v[-1].get("learn/micro_batches")} for name, v in ms.items()}


def measure_driver(ray, repeats: int = 5) -> dict:
    """Best-of-``repeats`` seconds to collate the demo's step and to ray.put it."""
    from troupe.learner.batch import collate_groups

    groups = demo_groups()
    collate, put = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch = collate_groups(groups, pad_id=0)
        collate.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref = ray.put(batch)
        put.append(time.perf_counter() - t0)
        del ref
    return {"collate": min(collate), "put": min(put), "rows": batch.size, "cols": batch.input_ids.shape[1]}


def run_all(model: str, steps: int, base: Optional[Path], rev: Optional[str]) -> dict:
    """Every measurement (module docstring); ``base``: the baseline tree's package folder, or None."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out: dict = {"fixed": {}, "padding": {}, "load_start": os.getloadavg()[0]}
        variants = _variants(base, rev)
        for ranks in (1, 2):
            for kl in (0.0, 0.05):
                for name, v in measure_fixed(ray, model, ranks, kl, variants, steps).items():
                    out["fixed"][(ranks, kl, name)] = v
        pad: dict = {}
        if base is not None:
            pad[f"{rev} (before): 16 rows, full step width"] = ([], base)
        pad["now: 16 rows, each trimmed to its own longest row"] = ([], None)
        pad["now: token budget 2048 (`learner.micro_batch_tokens`), sorted by length, trimmed"] = (
            ["learner.micro_batch_tokens=2048"], None)
        out["padding"] = measure_padding(ray, model, pad, max(2, steps // 30))
        out["driver"] = measure_driver(ray)
        out["transport"] = measure_transport(ray, steps)
        return out
    finally:
        ray.shutdown()


class _Baseline:
    """A git worktree of ``rev`` and a package folder (``troupe`` -> the tree's packages) to put on PYTHONPATH."""

    def __init__(self, rev: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="troupe-bench-"))
        self.tree, self.pkg = self.tmp / "tree", self.tmp / "pkg"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(self.tree), rev], check=True,
                       capture_output=True)
        (self.pkg / "troupe").mkdir(parents=True)
        (self.pkg / "troupe" / "__init__.py").write_text("")
        for p in PACKAGES:
            (self.pkg / "troupe" / p).symlink_to(self.tree / p)

    def close(self) -> None:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.tree)], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def untrimmed_padding() -> float:
    """Padding share of fixed micro-batches that keep the step's full width (the code before trimming)."""
    from troupe.learner.batch import collate_groups

    b = collate_groups(long_tail_groups(), pad_id=0)
    return 1.0 - float(b.attention_mask.sum()) / b.input_ids.numel()


def _ms(x) -> str:
    return "n/a" if x is None or x != x else f"{1000 * x:.1f}"


def report(res: dict, rev: Optional[str], steps: int, cmd: str) -> str:
    """The markdown report of ``run_all``'s results."""
    import deepspeed
    import ray
    import torch

    lines = [
        "# Learner fixed cost per step, and padding with token-budget micro-batches",
        "",
        f"Generated by `{cmd}` on {_dt.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, {os.cpu_count()} CPU "
        f"cores, Python {platform.python_version()}, torch {torch.__version__}, DeepSpeed {deepspeed.__version__}, "
        f"Ray {ray.__version__}. Learner ranks: DeepSpeed ZeRO-2 over gloo, 1 torch thread each; model: the demo's "
        "shape (Qwen2, hidden 128, 2 layers, 0.53 M parameters, float32). Every comparison is paired: the variants' "
        "learner groups run side by side and are stepped in turn"
        + (f"; `{rev} (before)` is the code of that revision (a git worktree imported by its rank actors), driven "
           "as it drove its ranks (`ray.put` of the batch)" if rev else "")
        + f". 1-minute load average {res['load_start']:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        "(other jobs shared the 2 cores), so single timings are noisy: medians, and an identical twin group shows "
        "the spread of the same work.",
        "",
        f"## Fixed cost: a tiny step (2 prompts x G=2, 4 rows, 24-36 tokens), medians of {steps} steps",
        "",
        "Milliseconds per step. wall = the driver's `LearnerGroup.train_step` (sending the batch, one call per rank, "
        "merging metrics); learner = the ranks' mean `learn_seconds`; driver + RPC = wall - learner; then the "
        "ranks' parts (`learn/*_seconds`); no-op call = a call to every rank that does nothing (the RPC floor).",
        "",
        "| ranks | reference (KL in loss) | code / path | wall | learner | driver + RPC | old log-prob forward | "
        "reference forward | update | no-op call |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (ranks, kl, name), v in res["fixed"].items():
        lines.append(f"| {ranks} | {'yes' if kl > 0 else 'no'} | {name} | {_ms(v['wall'])} | {_ms(v['learn'])} | "
                     f"{_ms(v['overhead'])} | {_ms(v.get(BREAKDOWN[0]))} | {_ms(v.get(BREAKDOWN[1]))} | "
                     f"{_ms(v.get(BREAKDOWN[2]))} | {_ms(v['noop_call'])} |")
    d = res["driver"]
    lines += [
        "",
        "## Driver-side pieces, timed alone (best of 5)",
        "",
        "| piece | ms |",
        "|---|---:|",
        f"| collate_groups of the demo's step ({d['rows']} rows x {d['cols']} columns, from Python lists) | "
        f"{_ms(d['collate'])} |",
        f"| ray.put of that TrainBatch | {_ms(d['put'])} |",
        "",
        f"## Sending the tiny batch (medians of {3 * steps}, alternated)",
        "",
        "The batch to every actor and 30 floats back from each, bare actors that do nothing else.",
        "",
        "| actors | ray.put once + reference (before) | by value (now, batches under 64 KiB) |",
        "|---:|---:|---:|",
        *[f"| {n} | {_ms(v['put'])} | {_ms(v['value'])} |" for n, v in res["transport"].items()],
        "",
        "## Padding: long-tailed responses (16 prompts x G=8 = 128 rows, responses 4-256 tokens), 1 rank",
        "",
        f"Learner seconds per step: median of {max(2, steps // 30)} steps after one warm-up.",
        "",
        "| micro-batches | padded share of the forward tokens | micro-batches per step | learner seconds per step |",
        "|---|---:|---:|---:|",
    ]
    if not rev:
        lines.append(f"| before: 16 rows, full step width (computed) | {untrimmed_padding():.3f} | 8 | n/a |")
    for name, v in res["padding"].items():
        share = untrimmed_padding() if v["padding_frac"] is None else v["padding_frac"]
        count = 8 if v["micro_batches"] is None else v["micro_batches"]
        lines.append(f"| {name} | {share:.3f} | {count:.0f} | {v['learn']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="tiny steps per variant and configuration")
    ap.add_argument("--baseline", default=None, help="git revision to compare with (a temporary worktree)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "step_fixed_cost.md"))
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from troupe.learner.tiny_model import build_tiny_model

    base = _Baseline(args.baseline) if args.baseline else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = build_tiny_model(str(Path(tmp) / "m"), ["0123456789+=<think></think><answer></answer> abc"] * 20)
            res = run_all(model, args.steps, None if base is None else base.pkg, args.baseline)
    finally:
        if base is not None:
            base.close()
    cmd = "python bench/bench_step_cost.py" + (f" --steps {args.steps}" if args.steps != 100 else "") + \
        (f" --baseline {args.baseline}" if args.baseline else "")
    text = report(res, args.baseline, args.steps, cmd)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
