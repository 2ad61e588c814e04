"""More than one node, on one machine: ``ray.cluster_utils.Cluster`` starts a head (no CPUs: the driver)
and three logical nodes of one CPU each, every one with its own raylet and object store. A run's
actors are placed as ``troupe.cluster.runtime.start_actors`` places them (one placement group,
PACK): one engine bundle and two learner-rank bundles of one CPU each cannot share a node, so the
engine and each ZeRO-3 rank land on three different nodes. Then, for real and across nodes:

* ``Actors.single_node()`` is False and ``sync.strategy: auto`` picks ``object_store``;
* the two learner ranks rendezvous on rank 0's node and train one GRPO step together (ZeRO-3
  collectives between nodes);
* the weight sync moves the buckets from rank 0's object store to the engine's node; what the
  engine loads equals rank 0's full gather bit for bit, and engine and learner then agree on a
  fixed sequence (float32, tolerance 1e-5).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_run_across_three_nodes(cluster, tmp_path):
    import ray
    from ray.util.placement_group import placement_group_table
    from transformers import AutoTokenizer

    from troupe.cluster.runtime import init_ray, start_actors
    from troupe.cluster.weight_sync import WeightSync
    from troupe.configs.schema import load_config
    from troupe.core.types import Prompt, Sampling
    from troupe.learner.batch import collate_groups
    from troupe.learner.tiny_model import build_tiny_model

    model = build_tiny_model(str(tmp_path / "m"), ["Compute 12+34. <think>1+3=4</think><answer>46</answer>"] * 30)
    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", [
        f"model.path={model}", "sft.enabled=false", "learner.zero_stage=3", "learner.num_ranks=2",
        "learner.num_cpus_per_rank=1", "rollout.num_cpus_per_engine=1", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=8", "learner.micro_batch_size=4", "learner.lr=0.01",
        f"cluster.address={cluster.address}", "cluster.rpc_timeout_s=600"])
    init_ray(cfg, None)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 4
    actors = start_actors(cfg, model, log=lambda s: None)
    try:
        nodes = placement_group_table(actors.pg)["bundles_to_node_id"]
        engine_node, rank_nodes = nodes[0], [nodes[1], nodes[2]]
        assert len({engine_node, *rank_nodes}) == 3, nodes  # engine, rank 0, rank 1: three nodes
        assert not actors.single_node()

        tok = AutoTokenizer.from_pretrained(model)
        ids = tok("Compute 12+34. ")["input_ids"]
        prompts = [Prompt(k, "", ids[: len(ids) - k], "q", "46") for k in range(2)]
        groups, _ = actors.engines.generate(prompts, Sampling(n=4, max_new_tokens=8, temperature=1.0, seed=0))
        for g in groups:  # a graded made-up reward: longer responses score higher
            g.rewards = [len(s.response_ids) / 8 + 0.1 * i for i, s in enumerate(g.samples)]
        m = actors.learners.train_step(collate_groups(groups, tok.pad_token_id))
        assert m["grad_norm"] > 0

        probe = ids + groups[0].samples[0].response_ids
        start = len(ids)

        def diff() -> float:
            lrn = actors.learners.sequence_logprobs(probe, start)
            return max(abs(a - b) for a, b in zip(actors.engines.sequence_logprobs(probe, start)[0], lrn))

        assert diff() > 1e-4  # the engine still samples the weights before the step
        sync = WeightSync(actors.learners, actors.engines, cfg.sync.strategy, actors.single_node(), cfg.sync.bucket_mb)
        try:
            out = sync.sync(1)
            assert out["sync_strategy"] == "object_store" and actors.engines.versions() == [1]
            full = ray.get(actors.learners.state_dict_ref())
            got = sync.strategy.kept_tensors()
            assert got.keys() == full.keys() and all(torch.equal(got[k], full[k]) for k in full)
            assert diff() < 1e-5
        finally:
            sync.close()
    finally:
        actors.shutdown()
