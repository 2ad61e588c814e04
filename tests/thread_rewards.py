"""Reward functions that report the scoring process's thread environment (tests/test_threads_cpu.py)."""

import os


def mkl_threads(prompts, completions, **kwargs):
    """Reward = MKL_NUM_THREADS of the reward worker (-1 when unset)."""
    return [float(os.environ.get("MKL_NUM_THREADS", -1))] * len(completions)


def omp_threads(prompts, completions, **kwargs):
    """Reward = OMP_NUM_THREADS of the reward worker (-1 when unset)."""
    return [float(os.environ.get("OMP_NUM_THREADS", -1))] * len(completions)
