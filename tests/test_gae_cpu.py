"""PPO-with-a-critic maths (troupe.learner.gae) by hand on a 4-token example (issue 27)."""

from __future__ import annotations

import pytest
import torch

from troupe.learner.gae import gae, token_rewards, value_loss, whiten

MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0],   # 3 response tokens, then padding
                     [1.0, 1.0, 1.0, 1.0]])


def test_token_rewards_put_the_reward_on_the_last_token_and_the_kl_on_every_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.0, 0.1, 0.0, 0.2]])
    r = token_rewards(torch.tensor([1.0, -0.5]), MASK, kl, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.10, 1.0 - 0.15, 0.0],
                             [0.0, -0.05, 0.0, -0.5 - 0.10]])
    assert torch.allclose(r, expected, atol=1e-7)
    assert torch.equal(token_rewards(torch.tensor([1.0, -0.5]), MASK), torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, -0.5]]))


def test_gae_by_hand_with_gamma_and_lambda_below_one():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7, 9.0]], dtype=torch.float64)  # the padded position's value is ignored
    m = MASK[:1].double()
    g, lam = 0.9, 0.8
    d2 = 1.0 - 0.7                      # last token: the next value is 0
    d1 = 0.0 + g * 0.7 - 0.6
    d0 = 0.0 + g * 0.6 - 0.5
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, m, gamma=g, lam=lam)
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]], dtype=torch.float64), atol=1e-12)


def test_gae_with_gamma_and_lambda_one_is_the_return_minus_the_value():
    r = token_rewards(torch.tensor([1.0, -0.5]), MASK, torch.rand(2, 4), kl_coef=0.1)
    v = torch.randn(2, 4)
    adv, ret = gae(r, v, MASK, gamma=1.0, lam=1.0)
    to_go = torch.flip(torch.cumsum(torch.flip(r * MASK, [1]), 1), [1])  # sum_{k >= t} r_k
    assert torch.allclose(adv, (to_go - v) * MASK, atol=1e-6)
    assert torch.allclose(ret, to_go * MASK, atol=1e-6)


def test_value_loss_by_hand_with_and_without_clipping():
    v = torch.tensor([[1.0, 0.0, 2.0, 5.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.0, 1.0, 0.0]])
    ret = torch.tensor([[0.0, 1.0, 1.2, 0.0]])
    m = MASK[:1]
    plain = value_loss(v, old, ret, m)
    assert torch.allclose(plain, torch.tensor([[0.5, 0.5, 0.32, 0.0]]))
    clipped = value_loss(v, old, ret, m, clip=0.2)
    # token 0: V clipped to 0.7, (0.7-0)^2 = 0.49 < 1.0 -> max is the unclipped 1.0
    # token 2: V clipped to 1.2, (1.2-1.2)^2 = 0 < 0.64 -> 0.64; token 1: unchanged
    assert torch.allclose(clipped, torch.tensor([[0.5, 0.5, 0.32, 0.0]]))
    ret2 = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    # token 0: unclipped (1-2)^2 = 1, clipped V 0.7: (0.7-2)^2 = 1.69 -> 1.69 (pessimistic)
    assert value_loss(v, old, ret2, m, clip=0.2)[0, 0].item() == pytest.approx(0.5 * 1.69)
    value_loss(v, old, ret2, m, clip=0.2).sum().backward()
    assert v.grad[0, 0] == 0.0  # the clipped branch carries no gradient to V
    assert v.grad[0, 3] == 0.0  # masked


def test_whiten_is_zero_mean_unit_std_over_the_masked_tokens():
    a = torch.randn(2, 4, dtype=torch.float64)
    w = whiten(a, MASK.double())
    sel = w[MASK.bool()]
    assert sel.mean().abs() < 1e-12 and (sel.std(correction=0) - 1).abs() < 1e-6 and w[0, 3] == 0


@pytest.mark.parametrize("call", [
    lambda: gae(torch.zeros(2, 4), torch.zeros(2, 3), MASK),
    lambda: gae(torch.zeros(2, 4), torch.zeros(2, 4), MASK, gamma=1.5),
    lambda: value_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), MASK, clip=0.0),
    lambda: token_rewards(torch.zeros(2), MASK, kl_coef=-1.0),
])
def test_bad_input_is_refused_by_name(call):
    with pytest.raises(ValueError):
        call()


def _batch(values=None):
    """2 prompts x G=2, response widths 3 and 4 (the first row padded), rewards 1, 0 | 0.5, NaN (excluded)."""
    from troupe.core.types import Group, Prompt, Sample
    from troupe.learner.batch import collate_groups

    groups = [Group(Prompt(0, "", [7, 8], "q", "1"), [Sample([5, 6, 9], [-1.0] * 3, "", False, 0),
                                                     Sample([5, 6, 9, 10], [-1.0] * 4, "", False, 0)], rewards=[1.0, 0.0]),
              Group(Prompt(1, "", [7], "q", "1"), [Sample([11, 12, 13, 14], [-1.0] * 4, "", False, 0),
                                                  Sample([15, 16], [-1.0] * 2, "", False, 0)], rewards=[0.5, None])]
    b = collate_groups(groups, pad_id=0)
    return b if values is None else b.with_(values=values * b.response_mask)


def _algo(**kw):
    from troupe.configs.schema import AlgoConfig

    return AlgoConfig(**{"advantage": {"name": "gae", "gamma": 0.9, "lam": 0.8, "whiten": False}, **kw})


def test_gae_is_a_registered_estimator_with_the_kl_on_every_token_and_returns_for_the_critic():
    """``algo.advantage: gae`` through troupe.learner.step (what a policy rank runs): the advantages are GAE of the
    sequence reward on the last token minus kl_coef * KL_t on every token, from the batch's values; the critic's
    targets are those advantages + values; with whitening only the advantages change."""
    from troupe.learner.step import step_advantages, step_returns

    values = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    b = _batch(values)
    kl = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) * b.response_mask
    algo = _algo(kl_in="reward", kl_coef=0.5)
    adv, stats = step_advantages(b, algo, 2, 16, kl)
    r = token_rewards(torch.nan_to_num(b.rewards), b.response_mask, kl, kl_coef=0.5)
    want_adv, want_ret = gae(r.double(), b.values.double(), b.response_mask.double(), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, want_adv.float(), atol=1e-6) and adv.dtype == torch.float32
    assert adv[3].abs().sum() == 0 and b.response_mask[3].sum() == 0  # the excluded sample: no advantage
    assert torch.allclose(step_returns(b, algo, 2, 16, kl), want_ret.float(), atol=1e-6)
    assert "adv/mean" in stats
    white, _ = step_advantages(b, algo.model_copy(update={"advantage": algo.advantage.model_copy(update={"whiten": True})}),
                               2, 16, kl)
    assert torch.allclose(white, whiten(want_adv, b.response_mask.double()).float(), atol=1e-6)
    # the KL in the loss (GRPO's place for it): only the sequence rewards make the returns
    plain = step_returns(b, _algo(), 2, 16)
    assert torch.allclose(plain, gae(token_rewards(torch.nan_to_num(b.rewards), b.response_mask).double(),
                                     b.values.double(), b.response_mask.double(), 0.9, 0.8)[1].float(), atol=1e-6)


def test_gae_without_values_and_returns_without_a_critic_are_refused():
    from troupe.learner.step import step_advantages, step_returns

    with pytest.raises(ValueError, match="critic"):
        step_advantages(_batch(), _algo(), 2, 16)
    from troupe.configs.schema import AlgoConfig

    with pytest.raises(ValueError, match="no critic"):
        step_returns(_batch(torch.zeros(4, 4)), AlgoConfig(), 2, 16)


@pytest.mark.parametrize("overrides,match", [
    (["algo.advantage=gae"], "add a critic section"),
    (["critic.lr=0.001"], "does not use it"),
    (["algo.advantage=gae", "critic.num_ranks=3"], "critic.num_ranks = 3"),
    (["algo.advantage=gae", "critic.model_path=/nonexistent-critic"], "critic.model_path"),
])
def test_critic_config_errors_name_the_key(overrides, match):
    from pathlib import Path

    from troupe.configs.schema import ConfigError, load_config

    repo = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=match):
        load_config(repo / "configs" / "arith_cpu.yaml", overrides)
    ok = load_config(repo / "configs" / "arith_cpu.yaml", ["algo.advantage=gae", "critic.lr=0.001"])
    assert ok.critic.lr == 0.001 and ok.critic.value_clip == 0.2 and ok.algo.advantage.uses_critic


def test_token_values_read_the_head_at_the_state_before_each_token_whatever_the_padding(tmp_path):
    """V_t is the value head at the position before response token t (OpenRLHF's convention), and a row's values
    do not depend on how much left padding its prompt got in the batch."""
    from troupe.learner.critic_rank import token_values
    from troupe.learner.tiny_model import build_tiny_model
    from troupe.reward.model import load_reward_model

    path = build_tiny_model(str(tmp_path / "m"), ["0123456789+=abc"] * 10, hidden_size=32, num_layers=1, num_heads=2,
                            num_kv_heads=1, intermediate_size=64, max_position_embeddings=64, seed=0)
    model = load_reward_model(path, seed=3).eval()
    b = _batch()
    with torch.no_grad():
        v = token_values(model, b)
        # row 2 (prompt [7], padded to width 2 in the batch) alone: the head on every position of prompt + response
        ids = torch.tensor([[7, 11, 12, 13, 14]])
        hidden = model.model(input_ids=ids).last_hidden_state
        alone = model.score(hidden).squeeze(-1)[0, :-1]  # positions 0..3 predict response tokens 0..3
    assert v.shape == (4, 4)
    assert torch.allclose(v[2], alone, atol=1e-5)
    assert v[0, 3] == 0 and v[3].abs().sum() == 0  # padding and the excluded sample
