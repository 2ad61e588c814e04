"""DeepSpeed's JIT-built C++ ops on CPU: built once at set-up, never first inside a learner actor.

DeepSpeed compiles two C++ extensions the first time a CPU learner starts: ``deepspeed_shm_comm``
(``deepspeed.init_distributed``) and ``fused_adam`` (``deepspeed.initialize`` with AdamW), with
torch's ``cpp_extension`` under ``TORCH_EXTENSIONS_DIR`` (troupe's default: ``.venv/torch_extensions``,
see :func:`use_venv_extensions_dir`).
Two things go wrong when that happens inside Ray actors:

* it takes minutes on a small machine (both ops: 82-103 s on 2 cores, alone; longer next to a
  running engine), all of it inside the first run's start-up;
* torch guards each build with a ``lock`` file (``FileBaton``) that it never expires: a process
  killed mid-build (a timeout, Ctrl-C, ``ray stop``) leaves the file behind and every later learner
  waits on it forever, silently. (This hung troupe's CI for 80 minutes.)

So ``scripts/setup.sh`` runs ``python -m troupe.core.ds_ops`` after installing (one process,
nothing else building), and :class:`troupe.learner.zero.ZeroRank` calls :func:`use_venv_extensions_dir`
and :func:`clear_stale_locks`
before DeepSpeed loads its ops, so a lock older than any real build is removed with a warning.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

#: DeepSpeed CPU op builders troupe's learner loads (``deepspeed.ops.op_builder.cpu``)
CPU_OPS = ("ShareMemCommBuilder", "FusedAdamBuilder")
#: a build lock older than this (seconds) has no live builder behind it (a real build takes < 10 min)
STALE_LOCK_S = 1200.0


def use_venv_extensions_dir() -> Path:
    """Point ``TORCH_EXTENSIONS_DIR`` at ``<sys.prefix>/torch_extensions`` unless the user set it, and put
    this interpreter's ``bin`` first on ``PATH`` when it holds ``ninja``; returns the extensions folder.

    torch's default, ``~/.cache/torch_extensions``, is shared by every virtual environment of the
    user, and a build's ``build.ninja`` names its venv's paths: two clones (or a CI check next to a
    working copy) rebuild over each other's ops. Per venv, ``rm -rf .venv`` also removes its builds.

    torch runs whichever ``ninja`` is first on ``PATH``, and ninja versions record a build's command
    hash differently in ``.ninja_log`` (the venv's pip ninja 1.13 and Debian's 1.11 here): a learner
    started with the venv on ``PATH`` (an activated shell, ``ray job submit``) and one started without
    it rebuilt both ops in turn, 65 s of start-up each time. The venv's own ninja (a DeepSpeed
    dependency) is always used.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if Path(bin_dir, "ninja").exists() and path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def extensions_dir() -> Path:
    """Where torch's ``cpp_extension`` builds and caches extensions (its own rule, without importing it)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    import torch

    tag = f"py{sys.version_info.major}{sys.version_info.minor}_" + \
        ("cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}")
    return Path.home() / ".cache" / "torch_extensions" / tag


def clear_stale_locks(max_age_s: float = STALE_LOCK_S, root: Path | None = None) -> list[Path]:
    """Remove build ``lock`` files older than ``max_age_s`` under ``root`` (default :func:`extensions_dir`).

    Args:
        max_age_s: age (seconds since the file's last modification) from which a lock is stale.
        root: the extensions folder; a missing folder is not an error.
    Returns:
        The removed paths (the caller logs them).
    """
    root = extensions_dir() if root is None else root
    removed = []
    now = time.time()
    for lock in sorted(root.glob("*/lock")) if root.is_dir() else []:
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # its builder finished meanwhile
            pass
    return removed


def build_cpu_ops(names: tuple[str, ...] = CPU_OPS) -> list[str]:
    """Build (or find built) DeepSpeed's CPU ops ``names``; returns the ops loaded.

    Raises:
        RuntimeError: an op DeepSpeed reports compatible failed to build (no compiler, no ninja);
            the message names the op.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401  (registers the op builders)
    from deepspeed.accelerator import get_accelerator

    loaded = []
    for name in names:
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            continue
        try:
            builder.load(verbose=False)
        except Exception as e:  # noqa: BLE001 - re-raised with the op's name
            raise RuntimeError(f"DeepSpeed op {builder.absolute_name()} ({name}) failed to build: {e}") from e
        loaded.append(builder.NAME)
    return loaded


def main() -> int:
    """``python -m troupe.core.ds_ops``: clear stale locks, build the CPU ops, say what was done."""
    use_venv_extensions_dir()
    for lock in clear_stale_locks():
        print(f"troupe: removed a stale DeepSpeed build lock {lock}")
    t0 = time.time()
    ops = build_cpu_ops()
    print(f"troupe: DeepSpeed CPU ops ready ({', '.join(ops) or 'none needed'}) in {time.time() - t0:.0f} s "
          f"under {extensions_dir()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
