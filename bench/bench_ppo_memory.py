"""What GRPO's group baseline saves: the learner side's memory and time, PPO with a critic against GRPO.

DeepSeekMath (4.1.1) makes GRPO's case against PPO: PPO trains a value model of the policy's size next to it.
This measures what that costs in troupe, learner side only (no engines, no rewards): real DeepSpeed ZeRO ranks
over gloo on this machine, one synthetic step batch of the demo's shape (64 prompts x G=8, prompts of 30
tokens, responses of 40), the same for both.

* GRPO: the policy's ranks (``LearnerRank``; with ``--kl`` a reference model in each) run ``train_step``.
* PPO: the same policy ranks (advantages by ``algo.advantage: gae``) plus the critic's ranks
  (``CriticRank``, a model of the policy's size with a value head): per step the critic's values, the
  policy's update, the critic's update, as ``troupe.cluster.train.learn`` runs them.

Per configuration: the peak resident memory of every rank process after ``--steps`` steps (``peak_memory``:
the kernel's high-water mark since the ranks were ready; the ranks' start-up imports are in both, so the
difference is the models' weights, gradients, AdamW moments and activations), summed over the processes;
and the median seconds per step, split into the policy's and the critic's parts. Models: the demo's shape
(0.6 M parameters) and a 25 M-parameter Qwen2 (hidden 512, 8 layers), each on 1 ZeRO-2 rank and on 2 ZeRO-3
ranks (each model's group the same size).

Usage::

    python bench/bench_ppo_memory.py [--steps 3] [--kl] [--out bench/results/ppo_memory.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
# model shape and prompts per step batch (G = 8): the demo's 64 prompts on its own model; 8 on the 25 M one, so
# that a step takes seconds, not minutes, on 2 CPU cores
MODELS = {"demo (0.6 M)": (dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512), 64),
          "25 M": (dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536), 8)}
LAYOUTS = [(1, 2), (2, 3)]  # (ranks per model, ZeRO stage)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_batch(prompts: int = 64, seed: int = 0):
    """The demo's step shape as a TrainBatch: ``prompts`` x G=8, prompts of 30 tokens, responses of 40."""
    import random

    from troupe.core.types import Group, Prompt, Sample
    from troupe.learner.batch import collate_groups

    rng = random.Random(seed)
    groups = [Group(Prompt(k, "", [rng.randrange(5, 200) for _ in range(30)], "q", "1"),
                    [Sample([rng.randrange(5, 200) for _ in range(40)], [-rng.random() for _ in range(40)], "", False, 0)
                     for _ in range(8)], rewards=[float(i % 2) for i in range(8)]) for k in range(prompts)]
    return collate_groups(groups, pad_id=0)


def measure(ray, model: str, algo: str, ranks: int, stage: int, steps: int, kl: bool, prompts: int) -> dict:
    """Peak RSS summed over the rank processes (bytes), the same above each process's resident size when ready,
    and per-step seconds of one configuration."""
    import torch

    from troupe.cluster.learners import LearnerGroup
    from troupe.configs.schema import load_config
    from troupe.learner.critic_rank import CriticRank
    from troupe.learner.zero import LearnerRank

    over = [f"learner.num_ranks={ranks}", f"learner.zero_stage={stage}", "learner.micro_batch_size=64",
            "learner.warmup_steps=0", f"algo.kl_coef={0.01 if kl else 0.0}"]
    if algo == "ppo":
        over += ["algo.advantage=gae", f"critic.num_ranks={ranks}", f"critic.zero_stage={stage}",
                 "critic.micro_batch_size=64"]
    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", [f"rollout.prompts_per_step={prompts}", *over])
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}}
    P = ray.remote(LearnerRank).options(num_cpus=0.1, runtime_env=env)
    port = _port()
    policy = LearnerGroup([P.remote(r, ranks, "127.0.0.1", port, model, cfg) for r in range(ranks)])
    groups = [policy]
    critic = None
    if algo == "ppo":
        C = ray.remote(CriticRank).options(num_cpus=0.1, runtime_env=env)
        port = _port()
        critic = LearnerGroup([C.remote(r, ranks, "127.0.0.1", port, model, cfg) for r in range(ranks)],
                              kind="critic rank")
        groups.append(critic)
    try:
        ready = []
        for g in groups:
            g.ready()
            ready += [m["rss"] for m in g.peak_memory(reset=True)]
        batch = demo_batch(prompts)
        t_policy, t_critic = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            b = batch.with_(values=torch.cat(critic.call("values", batch))) if critic else batch
            t1 = time.perf_counter()
            out = policy.train_step(b)
            t2 = time.perf_counter()
            if critic is not None:
                critic.call("train_step", b, out.pop("critic/returns"))
            t3 = time.perf_counter()
            t_policy.append(t2 - t1)
            t_critic.append(t1 - t0 + t3 - t2)
        peaks = [m["peak"] for g in groups for m in g.peak_memory()]
        return {"peak": sum(peaks), "above_ready": sum(p - r for p, r in zip(peaks, ready)), "per_process": peaks,
                "policy_s": statistics.median(t_policy),
                "critic_s": statistics.median(t_critic)}
    finally:
        for g in groups:
            g.shutdown()


def report(res: dict, steps: int, kl: bool, cmd: str) -> str:
    import deepspeed
    import ray
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Learner-side memory and time: PPO with a critic against GRPO",
        "",
        f"Generated by `{cmd}` at commit {commit} on {_dt.datetime.now():%Y-%m-%d %H:%M}; {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, torch {torch.__version__}, DeepSpeed "
        f"{deepspeed.__version__}, Ray {ray.__version__}. Ranks: DeepSpeed ZeRO over gloo, float32, 1 torch thread "
        f"each; one step batch of the demo's shape (prompts of 30 tokens, responses of 40, G = 8; 64 prompts on the "
        f"demo model, 8 on the 25 M one); {steps} steps per configuration; "
        f"reference model {'on (KL 0.01 in the loss)' if kl else 'off (KL 0, as the demo)'}. Peak = the kernel's "
        "resident high-water mark of each rank process since it was ready, summed over the processes; it includes "
        "each process's imports and start-up (torch, DeepSpeed, Ray: ~0.4-0.5 GiB a process), so 'above ready' "
        "(the peak minus each process's resident size when ready: what the steps added) is given too. Seconds: "
        "medians per step.",
        "",
        "| model | ranks per model, ZeRO | GRPO peak (GiB) | PPO peak (GiB) | PPO / GRPO | GRPO above ready (MiB) | "
        "PPO above ready (MiB) | GRPO s/step | PPO s/step (policy + critic) | PPO / GRPO time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, ranks, stage), v in res.items():
        g, p = v["grpo"], v["ppo"]
        lines.append(f"| {name} | {ranks} x ZeRO-{stage} | {g['peak'] / GIB:.2f} | {p['peak'] / GIB:.2f} | "
                     f"{p['peak'] / g['peak']:.2f} | {g['above_ready'] / 2**20:.0f} | {p['above_ready'] / 2**20:.0f} | "
                     f"{g['policy_s']:.2f} | {p['policy_s'] + p['critic_s']:.2f} "
                     f"({p['policy_s']:.2f} + {p['critic_s']:.2f}) | {(p['policy_s'] + p['critic_s']) / g['policy_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kl", action="store_true", help="a reference model in the policy's ranks (KL 0.01 in the loss)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names of MODELS")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "ppo_memory.md"))
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    from troupe.learner.tiny_model import build_tiny_model

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    res = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in args.models.split(","):
                shape, prompts = MODELS[name]
                model = build_tiny_model(str(Path(tmp) / name.split()[0]), ["0123456789+=<think></think> abc"] * 20,
                                         max_position_embeddings=256, num_kv_heads=shape["num_heads"], **shape)
                for ranks, stage in LAYOUTS:
                    res[(name, ranks, stage)] = {a: measure(ray, model, a, ranks, stage, args.steps, args.kl, prompts)
                                                 for a in ("grpo", "ppo")}
                    print(name, ranks, stage, {a: round(v["peak"] / GIB, 2) for a, v in res[(name, ranks, stage)].items()},
                          flush=True)
    finally:
        ray.shutdown()
    text = report(res, args.steps, args.kl, f"python bench/bench_ppo_memory.py --steps {args.steps}" + (" --kl" if args.kl else ""))
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
