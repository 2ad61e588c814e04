"""Thread environment of the actors: how many threads each may run, whatever the user's shell says.

Every Ray worker inherits the environment of the process that started the raylet (the driver,
for the embedded local cluster; the shell of ``ray start`` otherwise), and Ray itself only
fills in ``OMP_NUM_THREADS`` when it is unset. A shell with ``MKL_NUM_THREADS=2`` (common on
HPC nodes) therefore reaches vLLM's CPU worker, whose OpenMP threads vLLM binds to the cores it
picks itself: two MKL threads then fight for one bound core, and sampling 16 prompts x 8 x 32
tokens on the demo-size model took 4.86 s instead of 0.41 s (best of 5, 2 cores; docs/design.md,
tests/test_threads_slow.py). The actors' thread variables are therefore always set by troupe
(``troupe.cluster.runtime.thread_env``, ``troupe.reward.pool.RewardPool``): one count per actor,
from the CPUs it reserves.

Pure functions; no torch, no Ray.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

# the thread-count variables of the libraries torch and numpy use on the CPU: OpenMP (torch's
# intra-op pool, oneDNN), MKL (torch's BLAS/LAPACK on x86), OpenBLAS (numpy wheels)
THREAD_COUNT_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# every variable troupe sets for an actor's threads (what an actor reports in a check)
THREAD_VARS = THREAD_COUNT_VARS + ("OMP_PROC_BIND", "VLLM_CPU_OMP_THREADS_BIND")


def threads_for_cpus(num_cpus: float) -> int:
    """Threads for an actor that reserves ``num_cpus`` Ray CPUs: ``floor(num_cpus)``, at least 1.

    The same rule Ray applies to ``OMP_NUM_THREADS`` when it is unset (``ray._private.utils.
    set_omp_num_threads_if_unset``), so a fractional or zero reservation gets one thread.
    Raises ``ValueError`` for a negative or non-finite ``num_cpus``.
    """
    if not math.isfinite(num_cpus) or num_cpus < 0:
        raise ValueError(f"threads_for_cpus: num_cpus must be a finite number >= 0, got {num_cpus}")
    return max(1, math.floor(num_cpus))


def cpu_thread_env(threads: int) -> dict[str, str]:
    """Environment variables that run an actor's CPU maths on ``threads`` threads, unbound.

    ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` = ``threads`` (all three:
    torch's MKL ops read MKL's own variable, which the shell may set even where OMP's is right),
    and ``OMP_PROC_BIND=false``: a shell's ``OMP_PROC_BIND=true`` (or ``GOMP_CPU_AFFINITY``, which
    it takes precedence over in libgomp) would bind every actor's first thread to the same core.
    Raises ``ValueError`` if ``threads < 1``.
    """
    if threads < 1:
        raise ValueError(f"cpu_thread_env: threads must be >= 1, got {threads}")
    return {**{k: str(threads) for k in THREAD_COUNT_VARS}, "OMP_PROC_BIND": "false"}


def with_thread_env(runtime_env: Optional[dict], threads: int) -> dict:
    """``runtime_env`` (a Ray runtime_env dict, or None) with :func:`cpu_thread_env` added to its
    ``env_vars``; variables the caller's ``env_vars`` already sets keep the caller's value.
    The input is not modified."""
    env = dict(runtime_env or {})
    env["env_vars"] = {**cpu_thread_env(threads), **(env.get("env_vars") or {})}
    return env


def overridden(chosen: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``chosen`` that ``environ`` (the driver's shell) sets to something else,
    with the shell's values: what troupe's choice overrides, for the start-up log line."""
    return {k: environ[k] for k in chosen if k in environ and environ[k] != chosen[k]}
