"""Shared pytest fixtures.

``rm_dir``: a tiny reward-model folder (random 1-layer Qwen2 + scalar head, reward stats mean 0.05,
std 0.5), built once per module.

``ray_local``: the one local Ray cluster the tests use (module scope); every test that takes it
is marked ``@pytest.mark.ray``. Its workers get this folder on PYTHONPATH, so reward plugins in
tests/reward_plugins.py load by name there as in the test process. Ray is imported only when
the fixture runs, so test files that do not use it never import Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster (2 CPUs, no dashboard) for the module; yields the ``ray`` module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    pythonpath = os.pathsep.join(p for p in [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")] if p)
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory) -> str:
    """A tiny reward-model folder (module docstring)."""
    from troupe.learner.tiny_model import build_tiny_model
    from troupe.reward.model import load_reward_model, save_reward_model

    root = tmp_path_factory.mktemp("rm")
    corpus = ["What is 2+3? The answer is 5.", "Write a poem about the sea.", "<think>x</think><answer>7</answer>",
              "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"] * 10
    base = build_tiny_model(str(root / "base"), corpus, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                            intermediate_size=64, max_position_embeddings=256, seed=0)
    return save_reward_model(load_reward_model(base), str(root / "rm"), base,
                             stats={"mean": 0.05, "std": 0.5, "count": 40})
