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
from troupe.core.rpc import wait_all
from troupe.core.types import TrainBatch


class LearnerGroup:
    """The learner ranks of a run (Ray actor handles of ``troupe.learner.zero.LearnerRank``, or of another
    ``ZeroRank`` subclass through :meth:`call`; rank 0 first).

    Every wait goes through ``troupe.core.rpc.wait_all`` with a deadline: a rank that dies raises
    ``ActorFailed`` naming it ("learner rank 1"), as soon as it is known (its peers may be blocked
    in a collective); a call that outlives ``rpc_timeout_s`` raises ``RemoteTimeout``. Ranks are not
    restarted: a dead rank stops the run.

    Args:
        ranks: the rank actor handles, rank 0 first.
        rpc_timeout_s: longest wait for one call on all ranks (``cluster.rpc_timeout_s``).
    Raises:
        ValueError: no ranks.
    """

    def __init__(self, ranks: list, rpc_timeout_s: float = 3600.0) -> None:
        if not ranks:
            raise ValueError("LearnerGroup: no learner ranks")
        self._ranks = list(ranks)
        self.rpc_timeout_s = rpc_timeout_s

    def __len__(self) -> int:
        return len(self._ranks)

    @property
    def handles(self) -> list:
        """The rank actor handles (a copy; index = rank)."""
        return list(self._ranks)

    def _wait(self, refs: list, what: str, fetch: Optional[list[bool]] = None) -> list:
        """Every rank's result of ``what`` (``wait_all`` errors: ``ActorFailed``, ``RemoteTimeout``)."""
        names = [f"learner rank {r}" for r in range(len(self._ranks))]
        return wait_all(refs, names, what, self.rpc_timeout_s, fetch)

    def call(self, method: str, *args: Any, fetch: Optional[list[bool]] = None) -> list:
        """``method(*args)`` on every rank (each object put in the store once); every rank's result.

        For rank classes other than the GRPO learner (``troupe.learner.rm_rank.RewardModelRank``).
        """
        refs = [ray.put(a) for a in args]
        return self._wait([getattr(r, method).remote(*refs) for r in self._ranks], method, fetch)

    def ready(self) -> list[dict]:
        """Block until every rank has initialised; each rank's ``ready()`` facts."""
        return self._wait([r.ready.remote() for r in self._ranks], "ready")

    def train_step(self, batch: TrainBatch) -> dict:
        """One step on every rank (``LearnerRank.train_step``); metrics averaged over ranks."""
        ref = ray.put(batch)
        return mean_dicts(self._wait([r.train_step.remote(ref) for r in self._ranks], "train_step"))

    def set_algo(self, algo: AlgoConfig) -> None:
        """Switch every rank's algorithm section (between steps)."""
        self._wait([r.set_algo.remote(algo) for r in self._ranks], "set_algo")

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """The learner's log-probs of ``token_ids[start:]`` (every rank runs the forward; rank 0's result)."""
        return self._wait([r.sequence_logprobs.remote(token_ids, start) for r in self._ranks], "sequence_logprobs")[0]

    def save_weights(self, path: str) -> None:
        """Rank 0 writes the full weights to a safetensors file at ``path`` (gathered collectively)."""
        self._wait([r.save_weights.remote(path) for r in self._ranks], "save_weights")

    def state_dict_ref(self) -> Any:
        """An object-store reference to the full weights (rank 0's ``full_state_dict``), all ranks done.

        Rank 0's result is waited for but not fetched here (it is the whole model); a ``ready()``
        call on rank 0 afterwards confirms that rank 0 is still alive.
        """
        refs = [r.full_state_dict.remote() for r in self._ranks]
        self._wait(refs, "full_state_dict", [False] + [True] * (len(refs) - 1))
        wait_all([self._ranks[0].ready.remote()], ["learner rank 0"], "full_state_dict", self.rpc_timeout_s)
        return refs[0]

    def save_hf(self, out_dir: str, tokenizer_dir: str) -> Optional[str]:
        """An HF checkpoint (config, safetensors, tokenizer) written by rank 0; returns its folder."""
        return self._wait([r.save_hf.remote(out_dir, tokenizer_dir) for r in self._ranks], "save_hf")[0]

    def save_checkpoint(self, save_dir: str) -> None:
        """Every rank writes its DeepSpeed training state under ``save_dir`` (``LearnerRank.save_checkpoint``)."""
        self._wait([r.save_checkpoint.remote(save_dir) for r in self._ranks], "save_checkpoint")

    def load_checkpoint(self, save_dir: str) -> None:
        """Every rank restores its training state from ``save_dir`` (``LearnerRank.load_checkpoint``)."""
        self._wait([r.load_checkpoint.remote(save_dir) for r in self._ranks], "load_checkpoint")

    def shutdown(self) -> None:
        """Kill the rank actors."""
        for r in self._ranks:
            ray.kill(r)
        self._ranks = []
