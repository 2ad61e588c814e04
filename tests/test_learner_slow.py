"""The DeepSpeed learner: the update does not depend on how the batch is split.

One rank with the whole batch in one micro-batch, and two ranks with micro-batches of 2
(gradient accumulation 2 on each rank), must report the same loss and the same global
gradient norm: learner/zero.py scales each micro-batch loss by gas * world_size to undo
DeepSpeed's averaging, and every rank computes the advantages and the whole-mini-batch loss
normalisers from the whole batch (``LearnerRank.train_step``).
"""

from __future__ import annotations

import socket

import pytest
import torch

pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_loss_and_grad_norm_invariant_to_ranks_and_micro_batches(tmp_path, loss_agg, ray_local):
    from pathlib import Path

    from troupe.cluster.learners import LearnerGroup
    from troupe.configs.schema import load_config
    from troupe.core.types import Group, Prompt, Sample
    from troupe.learner.batch import collate_groups
    from troupe.learner.tiny_model import build_tiny_model
    from troupe.learner.zero import LearnerRank

    ray = ray_local
    repo = Path(__file__).resolve().parents[1]
    model = build_tiny_model(str(tmp_path / "m"), ["0123456789+=<think></think><answer></answer> abc"] * 20)
    g = torch.Generator().manual_seed(0)
    groups = []
    for k in range(2):
        samples = [Sample(torch.randint(5, 40, (2 + i + k,), generator=g).tolist(), [-3.0] * (2 + i + k), "", False, 0)
                   for i in range(4)]
        groups.append(Group(Prompt(k, "", [7, 8, 9][: 2 + k], "q", "1"), samples, rewards=[1.0, 0.0, 0.5, 0.0]))
    batch = collate_groups(groups, pad_id=0)
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}}
    results = {}
    for ranks, micro in ((1, 8), (2, 2)):
        cfg = load_config(repo / "configs" / "arith_cpu.yaml", [
            f"learner.num_ranks={ranks}", f"learner.micro_batch_size={micro}", "rollout.prompts_per_step=2",
            "rollout.group_size=4", f"algo.loss_agg={loss_agg}", "learner.grad_clip=1000", "algo.tis_cap=null"])
        port = _port()
        L = ray.remote(LearnerRank).options(num_cpus=0.5, runtime_env=env)
        learners = LearnerGroup([L.remote(r, ranks, "127.0.0.1", port, model, cfg) for r in range(ranks)])
        outs = ray.get([a.train_step.remote(batch) for a in learners.handles])
        results[ranks] = (sum(o["loss"] for o in outs), outs[0]["grad_norm"])
        if ranks == 2 and loss_agg == "token_mean":
            # a policy loss made up in a test (tests/test_algorithms_cpu.py: one function + one config
            # class) runs inside real learner ranks: its config class, pickled into the actors,
            # imports its module there, which registers the function
            from test_algorithms_cpu import ScaledReinforce

            learners.set_algo(cfg.algo.model_copy(update={"policy_loss": ScaledReinforce(scale=2.0)}))
            m = learners.train_step(batch)
            assert m["grad_norm"] > 0 and "ratio_mean" in m and "clip_frac_low" not in m
        learners.shutdown()
    (loss1, gn1), (loss2, gn2) = results[1], results[2]
    assert gn1 > 0
    assert loss1 == pytest.approx(loss2, rel=1e-4, abs=1e-6)
    assert gn1 == pytest.approx(gn2, rel=1e-3)


@pytest.mark.ray
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_nonfinite_step_changes_no_weight(tmp_path, stage, ray_local):
    """NaN guard: a step whose loss is NaN leaves every weight as it was and is counted; the next
    finite step trains as usual (ZeRO-0: troupe drops the gradients; ZeRO-2/3: DeepSpeed's overflow check)."""
    from pathlib import Path

    from fault_plugins import NaNLoss

    from troupe.cluster.learners import LearnerGroup
    from troupe.configs.schema import load_config
    from troupe.core.types import Group, Prompt, Sample
    from troupe.learner.batch import collate_groups
    from troupe.learner.tiny_model import build_tiny_model
    from troupe.learner.zero import LearnerRank

    ray = ray_local
    repo = Path(__file__).resolve().parents[1]
    model = build_tiny_model(str(tmp_path / "m"), ["0123456789+=<think></think><answer></answer> abc"] * 20)
    samples = [Sample([5 + i, 6, 7 + i], [-3.0] * 3, "", False, 0) for i in range(4)]
    batch = collate_groups([Group(Prompt(0, "", [7, 8], "q", "1"), samples, rewards=[1.0, 0.0, 0.5, 0.0])], pad_id=0)
    cfg = load_config(repo / "configs" / "arith_cpu.yaml", [
        f"learner.zero_stage={stage}", "learner.micro_batch_size=2", "rollout.prompts_per_step=1", "rollout.group_size=4"])
    env = {"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}}
    learners = LearnerGroup([ray.remote(LearnerRank).options(num_cpus=0.5, runtime_env=env).remote(
        0, 1, "127.0.0.1", _port(), model, cfg)])
    try:
        before = ray.get(learners.state_dict_ref())
        learners.set_algo(cfg.algo.model_copy(update={"policy_loss": NaNLoss()}))
        m = learners.train_step(batch)
        assert m["faults/nonfinite_steps"] == 1.0
        after = ray.get(learners.state_dict_ref())
        assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step changed the weights"
        learners.set_algo(cfg.algo.model_copy(update={"policy_loss": NaNLoss(poison=0.0)}))
        m = learners.train_step(batch)
        assert m["faults/nonfinite_steps"] == 0.0 and m["grad_norm"] > 0
        trained = ray.get(learners.state_dict_ref())
        assert any(not torch.equal(before[k], trained[k]) for k in before), "the finite step after it did not train"
    finally:
        learners.shutdown()
