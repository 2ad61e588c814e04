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
