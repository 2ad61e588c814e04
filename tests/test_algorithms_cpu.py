"""A new policy loss and a new advantage estimator are one function plus one config class each.

This test adds both (made up here, registered here) and drives them through the code the learner
ranks run: the run config chooses them by name and validates their settings, ``step_advantages``
computes the made-up advantages over the batch, ``grpo.policy_loss`` wraps the made-up per-token
loss with the shared TIS weight, KL term and split-invariant aggregation. Pure torch, no Ray.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
import yaml
from pydantic import Field

from troupe.configs.algos import AdvantageConfig, PolicyLossConfig
from troupe.configs.schema import ConfigError, dump_config, load_config
from troupe.core.types import Group, Prompt, Sample
from troupe.learner import grpo
from troupe.learner.batch import collate_groups
from troupe.learner.step import step_advantages

# ---- the made-up variants: one config class + one function each --------------------------------


class SignAdvantage(AdvantageConfig):
    """A_i = +1 if r_i > threshold, -1 if below, 0 if equal (made up for this test)."""

    name: Literal["sign"] = "sign"
    threshold: float = Field(0.5, ge=0.0, le=1.0)


@grpo.register_advantage("sign", SignAdvantage)
def sign_advantages(inp: grpo.AdvantageInputs, cfg: SignAdvantage) -> torch.Tensor:
    a = torch.sign(torch.nan_to_num(inp.rewards - cfg.threshold))
    return a.unsqueeze(1) * inp.response_mask


class ScaledReinforce(PolicyLossConfig):
    """l_t = -scale * A_t * rho_t, no clipping (made up for this test)."""

    name: Literal["scaled_reinforce"] = "scaled_reinforce"
    scale: float = Field(1.0, gt=0.0, le=10.0)


@grpo.register_policy_loss("scaled_reinforce", ScaledReinforce)
def scaled_reinforce(inp: grpo.LossInputs, cfg: ScaledReinforce):
    ratio = torch.exp(inp.logp - inp.old_logp)
    return -cfg.scale * inp.advantages * ratio, {"ratio_mean": (ratio * inp.response_mask).sum() / inp.response_mask.sum()}


# ---- the test -------------------------------------------------------------------------------------


def _config(tmp_path, algo: str):
    p = tmp_path / "run.yaml"
    p.write_text("model: {path: builtin:qwen2-tiny}\ndata: {source: 'troupe.demo.arith:ArithTask'}\n"
                 "rollout: {group_size: 2, prompts_per_step: 2, max_new_tokens: 8}\nlearner: {micro_batch_size: 4}\n" + algo)
    return load_config(p)


def _batch():
    def sample(n):
        return Sample([5] * n, [-1.0] * n, "x", False, 0)

    groups = [Group(Prompt(k, "q", [1, 2], "q", "1"), [sample(2), sample(3)], rewards=r)
              for k, r in enumerate([[1.0, 0.0], [0.25, 0.75]])]
    return collate_groups(groups, pad_id=0)


def test_made_up_estimator_and_loss_run_through_config_and_learner_maths(tmp_path):
    cfg = _config(tmp_path, "algo: {advantage: {name: sign, threshold: 0.5}, policy_loss: {name: scaled_reinforce, scale: 2.0},"
                            " tis_cap: null}\n")
    assert isinstance(cfg.algo.advantage, SignAdvantage) and isinstance(cfg.algo.policy_loss, ScaledReinforce)
    # the resolved config.yaml of a run names them with their settings, and loads back
    dumped = yaml.safe_load(dump_config(cfg))["algo"]
    assert dumped["advantage"] == {"name": "sign", "threshold": 0.5}
    assert dumped["policy_loss"] == {"name": "scaled_reinforce", "scale": 2.0}

    batch = _batch()
    adv, stats = step_advantages(batch, cfg.algo, 2, 8)
    # rewards [1, 0, .25, .75] vs threshold .5 -> signs [+1, -1, -1, +1] on each sample's tokens (2, 3, 2, 3)
    assert adv.tolist() == [[1, 1, 0], [-1, -1, -1], [-1, -1, 0], [1, 1, 1]]
    assert stats["zero_variance_frac"] == 0.0
    # the learner reports the shaped reward under its own name; reward_mean stays the loop's raw reward
    assert stats["reward_shaped_mean"] == pytest.approx(0.5) and "reward_mean" not in stats

    # the loss the ranks compute, on one micro-batch with rho = 1: l_t = -2 A_t, token mean over 10 tokens
    logp = torch.full(adv.shape, -1.0, requires_grad=True)
    inp = grpo.LossInputs(logp, logp.detach(), adv, batch.response_mask, batch.sampling_logprobs)
    norm = grpo.LossNorm(cfg.algo.loss_agg, float(batch.response_mask.sum()), 4.0, 8)
    loss, met = grpo.policy_loss(inp, cfg.algo.policy_loss, norm, tis_cap=cfg.algo.tis_cap)
    assert loss.item() == pytest.approx(-2.0 * float(adv.sum()) / 10)  # = 0: as many +1 as -1 tokens
    assert met["ratio_mean"].item() == pytest.approx(1.0) and "pg_loss" in met and "approx_kl_old" in met
    loss.backward()
    assert torch.allclose(logp.grad, -2.0 * adv / 10)


def test_made_up_variants_validate_their_settings(tmp_path):
    with pytest.raises(ConfigError, match=r"algo\.policy_loss.*scale"):
        _config(tmp_path, "algo: {policy_loss: {name: scaled_reinforce, scale: 0}}\n")
    with pytest.raises(ConfigError, match=r"algo\.advantage.*threshold"):
        _config(tmp_path, "algo: {advantage: {name: sign, threshold: 2}}\n")
    with pytest.raises(ConfigError, match=r"algo\.advantage.*unknown advantage estimator 'signs'.*sign"):
        _config(tmp_path, "algo: {advantage: signs}\n")
    with pytest.raises(ValueError, match="must default to 'ppo_clip'"):
        grpo.register_policy_loss("ppo_clip", ScaledReinforce)

    class OtherClip(PolicyLossConfig):
        name: Literal["ppo_clip"] = "ppo_clip"

    with pytest.raises(ValueError, match="already registered with PPOClipLoss"):
        grpo.register_policy_loss("ppo_clip", OtherClip)
