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


def test_the_venvs_ninja_builds_whatever_the_shell_path(monkeypatch):
    """A learner started with the venv first on PATH (``ray job submit``, an activated shell) and one started
    without it load the ops that set-up built: neither rebuilds them (two ninja versions used to alternate,
    each rebuilding both ops: core/ds_ops.py ``use_venv_extensions_dir``)."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    use_venv_extensions_dir()
    assert shutil.which("ninja") == str(Path(sys.executable).parent / "ninja")
    libs = sorted(extensions_dir().glob("*/*.so"))
    assert len(libs) == 2, libs
    before = [p.stat().st_mtime_ns for p in libs]
    venv_bin = str(Path(sys.executable).parent)
    for path in (f"{venv_bin}:/usr/bin:/bin", "/usr/bin:/bin"):
        env = {**os.environ, "PATH": path}
        env.pop("TORCH_EXTENSIONS_DIR", None)
        r = subprocess.run([sys.executable, "-c", "from troupe.core.ds_ops import use_venv_extensions_dir, build_cpu_ops;"
                            "use_venv_extensions_dir(); print(build_cpu_ops())"], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
    assert [p.stat().st_mtime_ns for p in libs] == before, "an op was rebuilt"
