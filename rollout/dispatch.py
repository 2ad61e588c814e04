"""Spread prompts over engines by load and pipe finished chunks straight to the reward pool.

A step's prompts are cut into chunks (``chunks_per_engine`` per engine). Each chunk goes to
the engine with the fewest outstanding prompts; as soon as a chunk's samples come back it is
submitted to the reward workers, so scoring of early chunks overlaps generation of later ones.
"""

from __future__ import annotations

import math
import time

import ray

from troupe.rollout.types import Group, Prompt


class RolloutDispatcher:
    """Drives engine actors and a reward pool for one batch of prompts.

    Args:
        engines: Ray actor handles of ``RolloutEngine``.
        reward_pool: object with ``submit(groups) -> ObjectRef[list[Group]]`` (``troupe.reward.pool.RewardPool``).
        chunks_per_engine: chunks each engine receives per call (>= 2 lets scoring overlap generation).
    """

    def __init__(self, engines: list, reward_pool, chunks_per_engine: int = 2) -> None:
        self.engines = engines
        self.reward_pool = reward_pool
        self.chunks_per_engine = chunks_per_engine

    def run(self, prompts: list[Prompt], *, n: int, max_new_tokens: int, temperature: float, top_p: float = 1.0,
            seed: int | None = None, score: bool = True, step_delimiter: str | None = None) -> tuple[list[Group], dict]:
        """Generate ``n`` samples per prompt and score them; groups come back in prompt order.

        ``step_delimiter`` (process supervision) makes the engines mark each sample's step ends.

        Returns (groups, timings) with timings {"generate": s until the last sample arrived,
        "reward": s spent waiting for scores after that, "engine_load": prompts per engine}.
        """
        t0 = time.time()
        size = max(1, math.ceil(len(prompts) / (len(self.engines) * self.chunks_per_engine)))
        chunks = [prompts[i:i + size] for i in range(0, len(prompts), size)]
        load = [0] * len(self.engines)
        gen_refs = {}
        for ci, chunk in enumerate(chunks):
            e = min(range(len(self.engines)), key=lambda k: load[k])
            load[e] += len(chunk)
            ref = self.engines[e].generate.remote(
                chunk, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                seed=None if seed is None else seed + ci, step_delimiter=step_delimiter)
            gen_refs[ref] = ci
        results: dict[int, object] = {}
        pending = list(gen_refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ci = gen_refs[done[0]]
            groups = ray.get(done[0])
            results[ci] = self.reward_pool.submit(groups) if score else groups
        t_gen = time.time() - t0
        out: list[Group] = []
        for ci in range(len(chunks)):
            r = results[ci]
            out.extend(self.reward_pool.get(r) if score else r)
        return out, {"generate": t_gen, "reward": time.time() - t0 - t_gen, "engine_load": load}
