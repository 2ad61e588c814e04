"""Shared pytest fixtures.

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
