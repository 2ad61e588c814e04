"""Resumable checkpoints: written atomically, found, pruned, and checked against the resuming config.

    <root>/step_<N>/                root: checkpoint.dir, default <run dir>/resume
        learner/state/...           every rank's DeepSpeed state (weights, optimizer, counters, RNG)
        trainer_state.json          step, policy version, prompt stream, fault counters, start eval
        metrics.jsonl               the run's metrics up to step N (a resumed run continues this copy)
        config.yaml                 the resolved config the checkpoint was written under

A checkpoint is written under ``<root>/.tmp-step_<N>`` and renamed to ``step_<N>`` once complete
(a rename within one filesystem is atomic). Only ``step_<N>`` folders holding trainer_state.json
count, so a run killed while writing leaves a ``.tmp-`` folder that is never loaded (the next
save removes it). The HF exports (``save_every``, the final weights) stay in <run dir>/checkpoints.

There are no dynamic-sampling leftovers to save: a refill round asks for exactly the missing
number of groups and unused groups are dropped, so every step starts from the prompt stream alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

import yaml

from troupe.configs.schema import ConfigError, RunConfig, dump_config

FORMAT = 1
STATE_FILE = "trainer_state.json"

# what a resumed run may not change: the model and its data, the group size, the learner layout
FIXED = ("model", "seed", "data", "sft", "rollout.group_size", "learner.num_ranks", "learner.zero_stage")


def checkpoint_root(cfg: RunConfig, run_dir: Path) -> Path:
    """Where the run's checkpoints live (``checkpoint.dir``, or <run dir>/resume)."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "resume"


def _step_of(path: Path) -> Optional[int]:
    m = re.fullmatch(r"step_(\d+)", path.name)
    return int(m.group(1)) if m and (path / STATE_FILE).is_file() else None


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp-`` folders never count)."""
    if not Path(root).is_dir():
        return []
    found = [(s, p) for p in Path(root).iterdir() if (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def latest(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def save(root: Path, step: int, learners, state: dict, cfg: RunConfig, metrics: Path, keep_last: int,
         critic=None) -> Path:
    """Write checkpoint ``step_<step>`` atomically and keep only the newest ``keep_last``.

    Args:
        root: the checkpoint root (created if missing).
        learners: the learner group (``save_checkpoint(dir)`` on every rank), under ``learner/``.
        critic: PPO's critic group (its ranks' full state under ``critic/``), or None.
        state: the driver's state (JSON-serialisable): step, policy version, stream, faults...
        metrics: the run's metrics.jsonl, copied as it is now.
    Returns the checkpoint folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp, final = root / f".tmp-step_{step}", root / f"step_{step}"
    tmp.mkdir()
    learners.save_checkpoint(str(tmp / "learner"))
    if critic is not None:
        critic.save_checkpoint(str(tmp / "critic"))
    shutil.copyfile(metrics, tmp / "metrics.jsonl")
    (tmp / "config.yaml").write_text(dump_config(cfg))
    _write_synced(tmp / STATE_FILE, json.dumps({"format": FORMAT, **state}))
    if final.exists():  # the same step saved again (a resumed run re-reaching it): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(path: Path) -> dict:
    """The driver state of checkpoint ``path``.

    Raises ``ConfigError`` naming the folder when it is not a complete checkpoint.
    """
    path = Path(path)
    if _step_of(path) is None:
        raise ConfigError(f"--resume {path}: not a complete checkpoint (expected a step_<N> folder with {STATE_FILE})")
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format") != FORMAT:
        raise ConfigError(f"--resume {path}: checkpoint format {state.get('format')}, this troupe reads {FORMAT}")
    return state


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part, {}) if isinstance(d, dict) else {}
    return d


def check_compatible(path: Path, cfg: RunConfig) -> list[str]:
    """Compare the resuming config with the checkpoint's; returns the changed keys that are allowed.

    Raises ``ConfigError`` listing every key of ``FIXED`` that differs (old -> new value).
    """
    old = yaml.safe_load((Path(path) / "config.yaml").read_text())
    new = cfg.model_dump(mode="json")
    bad = [f"  {k}: {_get(old, k)!r} -> {_get(new, k)!r}" for k in FIXED if _get(old, k) != _get(new, k)]
    if bad:
        raise ConfigError(f"--resume {path}: the config changes what a resumed run cannot change:\n" + "\n".join(bad)
                          + "\n(steps, eval, save and checkpoint cadence, cluster and algo settings may change)")

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    fo, fn = flat(old), flat(new)
    return sorted(k for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
