"""The learner group: a run's DeepSpeed learner-rank actors as one object.

Every call goes to every rank (each is collective under ZeRO-3) and the group returns what the
caller needs: merged metrics, rank 0's result, or nothing. A step batch of more than
``INLINE_BATCH_BYTES`` goes into the Ray object store once and every rank reads it from there; a
smaller one travels inside each call (Ray inlines arguments under 100 KiB, which skips the object
store's put and fetch: bench/results/step_fixed_cost.md).
Every rank then trains its own rows.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import ray

from troupe.cluster.metrics import mean_dicts
from troupe.configs.schema import AlgoConfig
from troupe.core.rpc import wait_all
from troupe.core.types import TrainBatch
from troupe.core.weights import WeightBucket

INLINE_BATCH_BYTES = 64 * 1024
"""Tensor bytes of a ``TrainBatch`` up to which ``LearnerGroup.train_step`` passes it by value (pickled
under Ray's 100 KiB inline limit, ``RAY_max_direct_call_object_size``) instead of putting it in the object store."""


def batch_bytes(batch: TrainBatch) -> int:
    """Bytes of the batch's tensors (its step-reward lists, process supervision only, not counted)."""
    return sum(t.numel() * t.element_size() for t in (batch.input_ids, batch.attention_mask, batch.response_mask,
                                                       batch.sampling_logprobs, batch.rewards, batch.truncated,
                                                       batch.response_lengths))


def inline_batch(batch: TrainBatch) -> bool:
    """Whether ``LearnerGroup.train_step`` passes ``batch`` by value: tensors of at most ``INLINE_BATCH_BYTES``
    and no step-reward lists (whose size the tensor bytes do not show)."""
    return batch.step_rewards is None and batch_bytes(batch) <= INLINE_BATCH_BYTES


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
        kind: how errors name a rank ("learner rank 1"; PPO's critic: "critic rank").
    Raises:
        ValueError: no ranks.
    """

    def __init__(self, ranks: list, rpc_timeout_s: float = 3600.0, kind: str = "learner rank") -> None:
        if not ranks:
            raise ValueError("LearnerGroup: no learner ranks")
        self._ranks = list(ranks)
        self.rpc_timeout_s = rpc_timeout_s
        self.kind = kind

    def __len__(self) -> int:
        return len(self._ranks)

    @property
    def handles(self) -> list:
        """The rank actor handles (a copy; index = rank)."""
        return list(self._ranks)

    def _wait(self, refs: list, what: str, fetch: Optional[list[bool]] = None, timeout_s: Optional[float] = None) -> list:
        """Every rank's result of ``what`` within ``timeout_s`` (a weight sync's ``sync.timeout_s``; default
        ``rpc_timeout_s``; ``wait_all`` errors: ``ActorFailed``, ``RemoteTimeout``)."""
        names = [f"{self.kind} {r}" for r in range(len(self._ranks))]
        if timeout_s is None:
            return wait_all(refs, names, what, self.rpc_timeout_s, fetch)
        return wait_all(refs, names, what, timeout_s, fetch, key="sync.timeout_s")

    def call(self, method: str, *args: Any, fetch: Optional[list[bool]] = None) -> list:
        """``method(*args)`` on every rank (each object put in the store once); every rank's result.

        For rank classes other than the GRPO learner (``troupe.learner.rm_rank.RewardModelRank``).
        """
        refs = [ray.put(a) for a in args]
        return self._wait([getattr(r, method).remote(*refs) for r in self._ranks], method, fetch)

    def ready(self) -> list[dict]:
        """Block until every rank has initialised; each rank's ``ready()`` facts."""
        return self._wait([r.ready.remote() for r in self._ranks], "ready")

    def train_step(self, batch: TrainBatch, *args: Any) -> dict:
        """One step on every rank (``*.train_step(batch, *args)``); metrics averaged over ranks, plus
        ``time/learn/rank_{r}`` (each rank's ``learn_seconds``); a value that is not a number (a tensor such as
        the policy's "critic/returns", from rank 0) is passed through as the rank returned it.

        The batch is put in the object store once, or passed by value when it is small and has no
        step-reward lists (module docstring)."""
        arg = batch if inline_batch(batch) else ray.put(batch)
        per_rank = self._wait([r.train_step.remote(arg, *args) for r in self._ranks], "train_step")
        tensors = {}  # values that are not numbers pass through (rank 0's "critic/returns")
        for m in per_rank:
            for k in [k for k, v in m.items() if not isinstance(v, (int, float))]:
                tensors[k] = m.pop(k)
        # each rank's own learn time (s): the slowest sets the step, the others wait at its collectives
        return {**mean_dicts(per_rank), **{f"time/learn/rank_{r}": m["learn_seconds"]
                                           for r, m in enumerate(per_rank) if "learn_seconds" in m}, **tensors}

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

    def weight_buckets(self, bucket_bytes: int) -> list[WeightBucket]:
        """The weight-sync bucket layout (rank 0's ``ZeroRank.weight_buckets``; every rank computes the same)."""
        return self._wait([self._ranks[0].weight_buckets.remote(bucket_bytes)], "weight_buckets")[0]

    def open_weight_sink(self, sink: Any) -> list:
        """Hand ``sink`` to every rank (``ZeroRank.open_weight_sink``; rank 0 writes the buckets into it);
        each rank's ``sink.open(rank)`` result. The sink is pickled once into the object store."""
        return self.call("open_weight_sink", sink)

    def send_weight_buckets(self, count: int, bucket_bytes: int, timeout_s: Optional[float] = None) -> Iterator[dict]:
        """Send buckets 0..count-1 of ``weight_buckets(bucket_bytes)``; yields each bucket's result once
        every rank is done with it, in order.

        All calls are submitted at once (each rank runs them in order, the ZeRO-3 gathers in step);
        the caller sees bucket i while the ranks already gather bucket i+1. Each item: {"descriptor":
        rank 0's ``sink.put`` result, "held_bytes": the most whole-parameter bytes any rank held
        during the gather, "seconds": rank 0's gather + put, "put_seconds": the put alone}. Raises ``ActorFailed`` naming the rank
        that failed, ``RemoteTimeout`` (each bucket within ``timeout_s``, default ``rpc_timeout_s``).
        """
        refs = [[r.send_weight_bucket.remote(i, bucket_bytes) for r in self._ranks] for i in range(count)]
        for i, bucket_refs in enumerate(refs):
            out = self._wait(bucket_refs, f"weight bucket {i}", timeout_s=timeout_s)
            yield {"descriptor": out[0]["descriptor"], "held_bytes": max(o["held_bytes"] for o in out),
                   "seconds": out[0]["seconds"], "put_seconds": out[0]["put_seconds"]}

    def close_weight_sink(self) -> None:
        """Every rank drops its weight sink (``ZeroRank.close_weight_sink``)."""
        self._wait([r.close_weight_sink.remote() for r in self._ranks], "close_weight_sink")

    def peak_memory(self, reset: bool = False) -> list[dict]:
        """Every rank's resident memory {"rss", "peak"} in bytes (``ZeroRank.peak_memory``; ``reset``
        restarts the peak)."""
        return self._wait([r.peak_memory.remote(reset) for r in self._ranks], "peak_memory")

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
