"""metrics.jsonl and the TensorBoard scalars written next to it (cluster/metrics.py)."""

from __future__ import annotations

import json
import math

from troupe.cluster.metrics import MetricsWriter


def test_metrics_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write({"step": 0, "eval/accuracy": 0.5})
    w.write({"step": 1, "reward_mean": 0.25, "loss": math.nan, "sync_strategy": "shm", "dynamic": True})
    w.write({"step": 2, "reward_mean": 0.75, "final": True})
    w.close()
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[1]["loss"] is None and recs[1]["sync_strategy"] == "shm"  # NaN -> null: the file stays JSON
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"eval/accuracy", "reward_mean"}  # NaN, strings, booleans and the step itself are not curves
    assert [(e.step, e.value) for e in acc.Scalars("reward_mean")] == [(1, 0.25), (2, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/accuracy")] == [(0, 0.5)]


def test_metrics_without_tensorboard_writes_no_event_files(tmp_path):
    w = MetricsWriter(tmp_path)
    w.write({"step": 1, "reward_mean": 1.0})
    w.close()
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward_mean"] == 1.0
