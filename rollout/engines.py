"""The engine group: a run's vLLM engine actors as one object (dispatch, weight receipt, sync check).

``EngineGroup`` owns the engine actor handles; the training loop, the weight sync and the sync
check all go through it, never through a bare list. This is where engine health and restarts
(issue "runs that survive") and pipelined generation plug in.

Dispatch: a batch of prompts is cut into chunks (``chunks_per_engine`` per engine); each chunk
goes to the engine with the fewest outstanding prompts, and as soon as a chunk's samples come
back it is handed to the reward pool, so scoring of early chunks overlaps generation of later ones.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

import ray

from troupe.core.types import Group, Prompt, Sampling


class EngineGroup:
    """The rollout engines of a run.

    Args:
        engines: Ray actor handles of ``troupe.rollout.engine.RolloutEngine``.
        chunks_per_engine: chunks each engine receives per ``generate`` call (>= 2 lets scoring
            overlap generation).
    """

    def __init__(self, engines: list, chunks_per_engine: int = 2) -> None:
        if not engines:
            raise ValueError("EngineGroup: no engines")
        self._engines = list(engines)
        self.chunks_per_engine = chunks_per_engine

    def __len__(self) -> int:
        return len(self._engines)

    @property
    def handles(self) -> list:
        """The engine actor handles (a copy; index = engine number)."""
        return list(self._engines)

    def ready(self) -> list[dict]:
        """Block until every engine has started; each engine's ``ready()`` facts."""
        return ray.get([e.ready.remote() for e in self._engines])

    def generate(self, prompts: list[Prompt], sampling: Sampling, rewards: Optional[Any] = None) -> tuple[list[Group], dict]:
        """Sample ``sampling.n`` responses per prompt on all engines, scored by ``rewards`` if given.

        Args:
            prompts: the prompts, any number.
            sampling: sampling settings (chunk c gets seed ``sampling.seed + c`` when a seed is set).
            rewards: an object with ``submit(groups) -> ref`` and ``get(ref) -> groups``
                (``troupe.reward.pool.RewardPool``), or None to return unscored groups.
        Returns:
            (groups in prompt order, timings {"generate": s until the last sample arrived, "reward":
            s spent waiting for scores after that, "engine_load": prompts per engine}).
        """
        t0 = time.time()
        size = max(1, math.ceil(len(prompts) / (len(self._engines) * self.chunks_per_engine)))
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        load = [0] * len(self._engines)
        refs = {}
        for ci, chunk in enumerate(chunks):
            e = min(range(len(self._engines)), key=lambda k: load[k])
            load[e] += len(chunk)
            seeded = sampling if sampling.seed is None else sampling.with_(seed=sampling.seed + ci)
            refs[self._engines[e].generate.remote(chunk, seeded)] = ci
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            groups = ray.get(done[0])
            results[refs[done[0]]] = rewards.submit(groups) if rewards is not None else groups
        t_gen = time.time() - t0
        out: list[Group] = []
        for ci in range(len(chunks)):
            out.extend(rewards.get(results[ci]) if rewards is not None else results[ci])
        return out, {"generate": t_gen, "reward": time.time() - t0 - t_gen, "engine_load": load}

    def _check_versions(self, results: list[dict], version: int) -> list[dict]:
        got = [r["version"] for r in results]
        if any(v != version for v in got):
            raise RuntimeError(f"weight sync: engines report versions {got}, expected {version}")
        return results

    def load_weights(self, path: str, version: int) -> list[dict]:
        """Every engine reloads the safetensors file at ``path`` (a path all engines can read) as ``version``.

        Raises ``RuntimeError`` if an engine reports another version afterwards.
        """
        return self._check_versions(ray.get([e.load_weights.remote(path, version) for e in self._engines]), version)

    def load_weights_from_store(self, state_ref: Any, version: int, scratch_dir: str) -> list[dict]:
        """Every engine fetches the state dict behind ``state_ref`` (Ray object store) and reloads it."""
        results = ray.get([e.load_weights_from_store.remote(state_ref, version, scratch_dir) for e in self._engines])
        return self._check_versions(results, version)

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[list[float]]:
        """Each engine's log-probs of ``token_ids[start:]`` given their prefix (the sync check)."""
        return ray.get([e.sequence_logprobs.remote(token_ids, start) for e in self._engines])

    def versions(self) -> list[int]:
        """The policy version each engine samples with."""
        return ray.get([e.get_version.remote() for e in self._engines])

    def shutdown(self) -> None:
        """Kill the engine actors."""
        for e in self._engines:
            ray.kill(e)
        self._engines = []
