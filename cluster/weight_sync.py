"""Weight sync: learner -> engines, stamped with a policy version (a sender plus a strategy).

The sender is the learner group: every rank takes part (the ZeRO-3 gather is collective),
rank 0 holds the full weights. A strategy moves them to the engines:

- ``shm``: rank 0 writes one safetensors file under /dev/shm; every engine on the node
  reloads from that path (one node; 0.02 s for the tiny model).
- ``object_store``: rank 0 returns the state dict through the Ray object store; each engine
  fetches it (any node), writes it locally and reloads.

The current version's weights stay (the shm file, the object ref) until the next sync replaces
them: an engine that dies and is replaced in between loads them before it samples again
(``EngineGroup.set_weights_source``). The shm file thus occupies one model's size in /dev/shm.

``auto`` picks ``shm`` when every actor is on one node, else ``object_store``. NCCL broadcast
into GPU engines is vLLM's own weight-transfer API (``init_weight_transfer_engine``) and plugs in
here as a third strategy on GPU clusters; it is not implemented for the CPU backend.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from troupe.cluster.learners import LearnerGroup
from troupe.rollout.engines import EngineGroup


class WeightSync:
    """Moves the learner's full weights into every engine, and keeps them for engine replacements.

    After a successful sync the current version's weights stay available until the next sync
    replaces them (shm: ``policy-v{version}.safetensors`` in the scratch folder; object_store: the
    object ref), and the engine group is told how to load them into a fresh engine
    (``EngineGroup.set_weights_source``).

    Args:
        learners: the ``LearnerGroup`` (the sender).
        engines: the ``EngineGroup`` (the receivers).
        strategy: "shm" | "object_store" | "auto".
        single_node: whether all actors share a node (decides "auto").
    """

    def __init__(self, learners: LearnerGroup, engines: EngineGroup, strategy: str, single_node: bool) -> None:
        if strategy == "auto":
            strategy = "shm" if single_node else "object_store"
        self.strategy = strategy
        self.learners, self.engines = learners, engines
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="troupe-sync-", dir=base)
        self._kept: Any = None  # the current version's file path (shm) or object ref (object_store)

    def sync(self, version: int) -> dict:
        """Push the current policy as ``version`` to all engines; returns timings and versions.

        Raises ``RuntimeError`` if an engine reports a different version afterwards, and the engine
        group's errors (``ActorFailed``, ``RemoteTimeout``); on failure the previous version's
        weights stay the engines' replacement source.
        """
        t0 = time.time()
        if self.strategy == "shm":
            path = os.path.join(self.dir, f"policy-v{version}.safetensors")
            self.learners.save_weights(path)
            t_send = time.time() - t0
            try:
                self.engines.load_weights(path, version)
            except BaseException:
                if path != self._kept:
                    _remove(path)
                raise
            self.engines.set_weights_source(version, lambda h, p=path, v=version: h.load_weights.remote(p, v))
            if self._kept is not None and self._kept != path:
                _remove(self._kept)
            self._kept = path
        else:
            state_ref = self.learners.state_dict_ref()
            t_send = time.time() - t0
            self.engines.load_weights_from_store(state_ref, version, self.dir)
            self.engines.set_weights_source(
                version, lambda h, r=state_ref, v=version, d=self.dir: h.load_weights_from_store.remote(r, v, d))
            self._kept = state_ref
        return {"sync_seconds": time.time() - t0, "sync_send_seconds": t_send, "policy_version": version,
                "sync_strategy": self.strategy}

    def close(self) -> None:
        """Remove the scratch folder (the kept weights with it) and drop the kept object ref; safe to call twice."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self._kept = None


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
