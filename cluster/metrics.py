"""Run directory, metrics.jsonl (+ TensorBoard) and per-step metric assembly (no Ray; torch only
for TensorBoard's writer, imported when one is asked for)."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from troupe.core.types import Group

# reward function names whose mean is reported as "accuracy"
ACCURACY_REWARDS = ("accuracy", "gsm8k", "math")


class MetricsWriter:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` (flushed every write) and,
    with ``tensorboard=True``, every finite number of the record as a TensorBoard scalar at the
    record's ``step`` under ``run_dir/tensorboard`` (``tensorboard --logdir runs``), as
    veRL's and OpenRLHF's tensorboard loggers do. Keys keep their slashes (``reward/accuracy_mean``),
    which TensorBoard shows as sections.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        """Write one record (non-finite floats become null, so the file stays valid JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps({"time": time.time(), **clean}) + "\n")
        self._f.flush()
        if self._tb is not None and isinstance(record.get("step"), int):
            for k, v in clean.items():
                if k not in ("step", "time", "final") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()

    def close(self) -> None:
        """Close the file (and the TensorBoard writer)."""
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def rollout_metrics(groups: list[Group], prefix: str = "") -> dict:
    """Reward mean/std overall and per reward function, accuracy, response length, truncation, failures."""
    rewards = [r for g in groups for r in g.rewards if r is not None]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    out = {f"{prefix}reward_mean": _mean(rewards), f"{prefix}reward_std": _std(rewards),
           f"{prefix}response_len_mean": _mean(lengths), f"{prefix}response_len_max": max(lengths, default=0),
           f"{prefix}truncated_frac": _mean([float(s.truncated) for g in groups for s in g.samples]),
           f"{prefix}num_samples": len(lengths)}
    names = sorted({n for g in groups for n in g.reward_parts})
    for n in names:
        vals = [v for g in groups for v in g.reward_parts.get(n, []) if v is not None]
        out[f"{prefix}reward/{n}_mean"] = _mean(vals)
        out[f"{prefix}reward/{n}_std"] = _std(vals)
        if n in ACCURACY_REWARDS and f"{prefix}accuracy" not in out:
            out[f"{prefix}accuracy"] = _mean(vals)
    fails: dict[str, int] = {}
    for g in groups:
        for k, v in g.failures.items():
            fails[k] = fails.get(k, 0) + v
    for k, v in fails.items():
        out[f"{prefix}reward/failures/{k}"] = v
    out[f"{prefix}reward/failures"] = sum(fails.values())
    return out


def mean_dicts(ds: list[dict]) -> dict:
    """Key-wise mean of numeric values over ranks' metric dicts."""
    keys = {k for d in ds for k, v in d.items() if isinstance(v, (int, float))}
    return {k: _mean([d[k] for d in ds if k in d and d[k] is not None]) for k in sorted(keys)}


def make_run_dir(output_dir: str, name: str) -> Path:
    """``output_dir/name``; an existing one gets a numeric suffix so no run is overwritten."""
    base = Path(output_dir) / name
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    os.makedirs(path)
    return path
