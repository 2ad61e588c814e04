"""cluster/ray_metrics.py: troupe's metrics reach the node's Prometheus endpoint through ray.util.metrics."""

from __future__ import annotations

import time
import urllib.request

import pytest

from troupe.cluster.ray_metrics import RayMetrics, prometheus_name


def test_prometheus_names():
    assert prometheus_name("reward/accuracy_mean") == "troupe_reward_accuracy_mean"
    assert prometheus_name("eval/pass@4") == "troupe_eval_pass_4"
    assert prometheus_name("time/generate") == "troupe_time_generate"


@pytest.mark.ray
def test_gauges_are_exported_on_the_node_endpoint(ray_local):
    ray = ray_local
    m = RayMetrics("metrics-test")
    assert m.export({"step": 3, "reward_mean": 0.625, "reward/accuracy_mean": 0.5, "final": True,
                     "note": "text", "bad": float("nan")}) == 3
    port = ray._private.worker.global_worker.node.metrics_export_port
    url = f"http://127.0.0.1:{port}/metrics"
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray's agent exports on its report interval (a few seconds)
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if "troupe_reward_accuracy_mean" in text and "troupe_step" in text:
            break
        time.sleep(1)
    lines = [x for x in text.splitlines() if x.startswith(("ray_troupe_", "troupe_")) and 'run="metrics-test"' in x]
    values = {x.split("{")[0]: float(x.rsplit(" ", 1)[1]) for x in lines}
    assert values.get("ray_troupe_reward_mean", values.get("troupe_reward_mean")) == 0.625, lines
    assert values.get("ray_troupe_reward_accuracy_mean", values.get("troupe_reward_accuracy_mean")) == 0.5
    assert values.get("ray_troupe_step", values.get("troupe_step")) == 3
    assert not any("troupe_bad" in x or "troupe_final" in x for x in lines)
