"""Shared pytest fixtures.

``rm_dir``: a tiny reward-model folder (random 1-layer Qwen2 + scalar head, reward stats mean 0.05,
std 0.5), built once per module.

``ray_head``: one Ray head for the whole test session (``ray start --head``, tests/ray_head.py), started
when the first ``@pytest.mark.ray`` test runs. Every such test runs with RAY_ADDRESS pointing at it, so a
run the test starts (``troupe train`` in-process or in a subprocess) joins it instead of starting and
stopping an embedded cluster of its own (4-6 s each, ~40 runs in the slow suite). A test that needs a
cluster of its own (actors found among its driver's descendants, an environment its workers must
inherit) says ``cluster.address=local`` or drops RAY_ADDRESS from its subprocess's environment. The
head's workers inherit this environment plus this folder on PYTHONPATH, so reward plugins in
tests/reward_plugins.py load by name there as in the test process.

``ray_local``: the test process joins that head for the module (a driver of its own: its actors and
placement groups end with the module); every test that takes it is marked ``@pytest.mark.ray``. Ray
is imported only when a fixture runs, so test files that use neither never import Ray.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent


def _tests_pythonpath() -> str:
    return os.pathsep.join(p for p in [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")] if p)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """The session's Ray head (module docstring): 16 logical CPUs (no test needs more; nothing is pinned to
    them), no dashboard. Token authentication off for the whole session, in this process's environment too
    (RAY_AUTH_MODE=disabled): Ray 2.60 turns it on for a cluster whenever a token exists (~/.ray/auth_token,
    which any local ``ray.init`` creates), and a process that had started a local cluster with it could not
    join the head afterwards (tests/test_threads_slow.py before tests/test_weight_sync_slow.py: the actors
    were cancelled before they ran); with a token for the session instead, a process whose Ray had read the
    mode before could not join either. Clusters the tests start themselves, in this process or in a
    subprocess, run without auth as the head does; tests/test_job_slow.py sets its own. Yields the
    ``ray_head.Head``."""
    import tempfile

    from ray_head import Head

    auth = {"RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    root = Path(tempfile.mkdtemp(prefix="trh", dir="/tmp"))  # Ray's socket paths under it stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=_tests_pythonpath(), **auth)
    head = Head(root, env, num_cpus=16, temp_dir=root / "ray", dashboard=False)
    try:
        head.wait_started()
        yield head
    finally:
        left = head.stop()
        shutil.rmtree(root, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        assert not left, f"the session's Ray head left processes behind: {left}"


@pytest.fixture(autouse=True)
def _join_session_ray_head(request, monkeypatch):
    """``@pytest.mark.ray`` tests run with RAY_ADDRESS set to the session's head (module docstring)."""
    if request.node.get_closest_marker("ray") is not None:
        monkeypatch.setenv("RAY_ADDRESS", request.getfixturevalue("ray_head").address)


@pytest.fixture(scope="module")
def ray_local(ray_head):
    """The test process joined to the session's Ray head for the module; yields the ``ray`` module."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": _tests_pythonpath()}})
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
