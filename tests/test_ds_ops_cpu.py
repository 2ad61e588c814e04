"""core/ds_ops.py: stale DeepSpeed build locks are removed, live ones kept; the CPU ops load once built."""

from __future__ import annotations

import os
import time

from troupe.core.ds_ops import build_cpu_ops, clear_stale_locks, extensions_dir, use_venv_extensions_dir


def test_only_locks_older_than_the_limit_are_removed(tmp_path):
    old, fresh = tmp_path / "fused_adam" / "lock", tmp_path / "deepspeed_shm_comm" / "lock"
    for p in (old, fresh):
        p.parent.mkdir()
        p.touch()
    (tmp_path / "fused_adam" / "fused_adam.so").touch()  # other files are never touched
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert clear_stale_locks(max_age_s=1200, root=tmp_path) == [old]
    assert not old.exists() and fresh.exists() and (tmp_path / "fused_adam" / "fused_adam.so").exists()
    assert clear_stale_locks(max_age_s=1200, root=tmp_path / "missing") == []


def test_extensions_dir_follows_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_dir() == tmp_path
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_dir().parent.name == "torch_extensions"


def test_setup_built_the_ops_the_learner_loads(monkeypatch):
    """`make setup` ran ``python -m troupe.core.ds_ops``: loading is now a cache hit, with no lock left."""
    import sys
    from pathlib import Path

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "unset-below")  # so that monkeypatch restores the caller's value
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert use_venv_extensions_dir() == Path(sys.prefix) / "torch_extensions" == extensions_dir()
    assert (extensions_dir() / "fused_adam").is_dir(), "make setup did not build the ops into this venv"
    assert build_cpu_ops() == ["deepspeed_shm_comm", "fused_adam"]
    assert not list(extensions_dir().glob("*/lock"))
