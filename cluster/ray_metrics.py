"""troupe's step metrics as Ray metrics (``ray.util.metrics``), for the Ray dashboard and Prometheus.

Every finite number of a metrics record becomes a gauge named ``troupe_<key>`` with the key's
characters outside ``[a-zA-Z0-9_]`` replaced by ``_`` (``reward/accuracy_mean`` ->
``troupe_reward_accuracy_mean``, ``eval/pass@4`` -> ``troupe_eval_pass_4``), tagged with the run
name (``run``) and, for SFT records, ``stage``. Ray's metrics agent exports them on each node's
Prometheus endpoint (with Ray's ``ray_`` prefix: ``ray_troupe_reward_mean``), which the Ray
dashboard's Metrics page and Grafana read (Ray docs, "Adding application-level metrics").
A gauge holds the latest value; the step is exported as ``troupe_step``.
"""

from __future__ import annotations

import math
import re
from typing import Any

_BAD = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_name(key: str) -> str:
    """``troupe_`` + ``key`` with every character outside ``[a-zA-Z0-9_]`` replaced by ``_``."""
    return "troupe_" + _BAD.sub("_", key)


class RayMetrics:
    """Gauges created on first use, one per metric key (held by this object, not the module).

    Args:
        run: the run name, the ``run`` tag of every gauge.
    Raises:
        RuntimeError: Ray is not initialised in this process.
    """

    def __init__(self, run: str) -> None:
        import ray

        if not ray.is_initialized():
            raise RuntimeError("RayMetrics needs Ray: call ray.init() first")
        self.run = run
        self._gauges: dict[str, Any] = {}

    def export(self, record: dict) -> int:
        """Set a gauge for every finite number in ``record`` (bools excluded); returns how many were set."""
        from ray.util.metrics import Gauge

        tags = {"run": self.run, "stage": str(record.get("stage", "grpo"))}
        n = 0
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            name = prometheus_name(key)
            gauge = self._gauges.get(name)
            if gauge is None:
                gauge = self._gauges[name] = Gauge(name, description=f"troupe metric {key}", tag_keys=("run", "stage"))
            gauge.set(float(value), tags=tags)
            n += 1
        return n
