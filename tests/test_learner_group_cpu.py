"""LearnerGroup.train_step's transport: a small step batch travels inside each call, a large one goes into
the object store once; either way every rank gets the whole batch and the metrics are averaged over ranks."""

from __future__ import annotations

import pytest

from troupe.cluster.learners import INLINE_BATCH_BYTES, batch_bytes, inline_batch
from troupe.core.types import Group, Prompt, Sample
from troupe.learner.batch import collate_groups


def _batch(prompts: int, G: int, n: int, steps: bool = False):
    groups = [Group(Prompt(k, "", [3, 4, 5], "q", "1"), [Sample([7] * n, [-1.0] * n, "", False, 0, [n - 1] if steps else [])
                                                         for _ in range(G)], rewards=[1.0] * G,
                    step_rewards=[[0.5]] * G if steps else []) for k in range(prompts)]
    return collate_groups(groups, pad_id=0)


def test_small_batches_go_by_value_large_ones_and_step_rewards_by_reference():
    tiny, demo = _batch(2, 2, 20), _batch(64, 8, 40)
    # 4 rows x 23 columns: ids and mask (int64), response mask and log-probs (float32), per-row vectors
    assert batch_bytes(tiny) == 4 * 23 * 8 * 2 + 4 * 20 * 4 * 2 + 4 * (4 + 1 + 8)
    assert inline_batch(tiny) and batch_bytes(demo) > INLINE_BATCH_BYTES and not inline_batch(demo)
    assert not inline_batch(_batch(2, 2, 20, steps=True))


class EchoRank:
    """A stand-in rank: reports what it received."""

    def __init__(self, value: float) -> None:
        self.value = value

    def train_step(self, batch) -> dict:
        return {"rows": float(batch.size), "ids_sum": float(batch.input_ids.sum()), "v": self.value}


@pytest.mark.ray
def test_every_rank_gets_the_whole_batch_either_way(ray_local):
    from troupe.cluster.learners import LearnerGroup

    ranks = [ray_local.remote(EchoRank).options(num_cpus=0).remote(v) for v in (1.0, 3.0)]
    group = LearnerGroup(ranks, rpc_timeout_s=60)
    try:
        for batch in (_batch(2, 2, 20), _batch(64, 8, 40)):
            m = group.train_step(batch)
            assert m == {"rows": float(batch.size), "ids_sum": float(batch.input_ids.sum()), "v": 2.0}
    finally:
        group.shutdown()
