"""The learner group: a run's DeepSpeed learner-rank actors as one object.

Every call goes to every rank (each is collective under ZeRO-3) and the group returns what the
caller needs: merged metrics, rank 0's result, or nothing. The step batch goes into the Ray object
store once and every rank reads it from there (zero-copy on a node), then trains its own rows.
"""

from __future__ import annotations

from typing import Any, Optional

import ray

from troupe.cluster.metrics import mean_dicts
from troupe.configs.schema import AlgoConfig
from troupe.core.types import TrainBatch


class LearnerGroup:
    """The learner ranks of a run (Ray actor handles of ``troupe.learner.zero.LearnerRank``, rank 0 first)."""

    def __init__(self, ranks: list) -> None:
        if not ranks:
            raise ValueError("LearnerGroup: no learner ranks")
        self._ranks = list(ranks)

    def __len__(self) -> int:
        return len(self._ranks)

    @property
    def handles(self) -> list:
        """The rank actor handles (a copy; index = rank)."""
        return list(self._ranks)

    def ready(self) -> list[dict]:
        """Block until every rank has initialised; each rank's ``ready()`` facts."""
        return ray.get([r.ready.remote() for r in self._ranks])

    def train_step(self, batch: TrainBatch) -> dict:
        """One step on every rank (``LearnerRank.train_step``); metrics averaged over ranks."""
        ref = ray.put(batch)
        return mean_dicts(ray.get([r.train_step.remote(ref) for r in self._ranks]))

    def set_algo(self, algo: AlgoConfig) -> None:
        """Switch every rank's algorithm section (between steps)."""
        ray.get([r.set_algo.remote(algo) for r in self._ranks])

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """The learner's log-probs of ``token_ids[start:]`` (every rank runs the forward; rank 0's result)."""
        return ray.get([r.sequence_logprobs.remote(token_ids, start) for r in self._ranks])[0]

    def save_weights(self, path: str) -> None:
        """Rank 0 writes the full weights to a safetensors file at ``path`` (gathered collectively)."""
        ray.get([r.save_weights.remote(path) for r in self._ranks])

    def state_dict_ref(self) -> Any:
        """An object-store reference to the full weights (rank 0's ``full_state_dict``), all ranks done."""
        refs = [r.full_state_dict.remote() for r in self._ranks]
        ray.get(refs[1:])
        return refs[0]

    def save_hf(self, out_dir: str, tokenizer_dir: str) -> Optional[str]:
        """An HF checkpoint (config, safetensors, tokenizer) written by rank 0; returns its folder."""
        return ray.get([r.save_hf.remote(out_dir, tokenizer_dir) for r in self._ranks])[0]

    def shutdown(self) -> None:
        """Kill the rank actors."""
        for r in self._ranks:
            ray.kill(r)
        self._ranks = []
