"""CPU unit tests of troupe.learner.grpo: hand-derived values (docs/design.md "The maths" and more,
with the arithmetic in comments) and hypothesis property tests. Pure torch, no network, a few seconds."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.configs.algos import ADVANTAGE_CONFIGS, GSPOLoss, PolicyLossConfig, PPOClipLoss
from troupe.learner import grpo

NAN = float("nan")
PROPS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def adv_cfg(estimator, **kw):
    """The estimator's typed config; settings it does not have (e.g. std for rloo) are left out."""
    cls = ADVANTAGE_CONFIGS.config_class(estimator)
    return ADVANTAGE_CONFIGS.parse({"name": estimator, **{k: v for k, v in kw.items() if k in cls.model_fields}}, "grpo")


def advantages(estimator, rewards, G, mask, **kw):
    """[B, T] advantages of the registered estimator (rewards a [B] tensor)."""
    return grpo.compute_advantages(grpo.AdvantageInputs(rewards, mask, G), adv_cfg(estimator, **kw))


def seq_adv(estimator, rewards, G, **kw):
    """Per-sequence advantages [B] (T = 1, all-ones mask)."""
    r = torch.tensor(rewards, dtype=torch.float32)
    return advantages(estimator, r, G, torch.ones(len(rewards), 1), **kw)[:, 0]


def process_adv(step_rewards, step_ends, G, T, **kw):
    """Process-supervision advantages [B, T] (all-ones response mask)."""
    inp = grpo.AdvantageInputs(torch.zeros(len(step_rewards)), torch.ones(len(step_rewards), T), G, step_rewards, step_ends)
    return grpo.compute_advantages(inp, adv_cfg("process", **kw))


def ploss(logp, old, adv, mask, *, ratio_level="token", clip_low=0.2, clip_high=0.28, dual_clip=None, sampling_logp=None,
          tis_cap=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3", loss_agg="token_mean", num_tokens, num_seqs,
          max_len):
    """The policy loss with the registered ppo_clip (token ratio) or gspo (sequence ratio) config."""
    cfg = (PPOClipLoss(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip) if ratio_level == "token"
           else GSPOLoss(clip_low=clip_low, clip_high=clip_high))
    inp = grpo.LossInputs(logp, old, adv, mask, sampling_logp, ref_logp)
    return grpo.policy_loss(inp, cfg, grpo.LossNorm(loss_agg, num_tokens, num_seqs, max_len), tis_cap=tis_cap,
                            kl_coef=kl_coef, kl_estimator=kl_estimator)


# --------------------------------------------------------------------------------------------
# advantages: exact values
# --------------------------------------------------------------------------------------------


def test_grpo_design_values():
    # mean 0.5; unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    # 0.5 / (0.5773503 + 1e-6) = 0.8660239 ; 0.5 / (0.5773503 + 1e-4) = 0.8658754
    close(seq_adv("grpo", [1, 0, 0, 1], 4), [0.8660239, -0.8660239, -0.8660239, 0.8660239])
    close(seq_adv("grpo", [1, 0, 0, 1], 4, eps=1e-4), [0.8658754, -0.8658754, -0.8658754, 0.8658754])
    # constant groups -> exactly 0, for every estimator that is group-relative
    for est in ("grpo", "dr_grpo", "rloo"):
        a = seq_adv(est, [0.1, 0.1, 0.1, 0.7, 0.7, 0.7], 3)
        assert torch.equal(a, torch.zeros(6)), est


def test_grpo_population_std():
    # population std of [1,0,0,1] = sqrt(4 * 0.25 / 4) = 0.5 ; 0.5 / (0.5 + 1e-6) = 0.999998
    close(seq_adv("grpo", [1, 0, 0, 1], 4, std="population"), [0.999998, -0.999998, -0.999998, 0.999998])


def test_dr_grpo_and_rloo_values():
    # Dr.GRPO [3,1,2]: mean 2 -> [1, -1, 0]
    close(seq_adv("dr_grpo", [3, 1, 2], 3), [1, -1, 0])
    # RLOO [3,1,2]: 3 - (1+2)/2 = 1.5 ; 1 - (3+2)/2 = -1.5 ; 2 - (3+1)/2 = 0
    close(seq_adv("rloo", [3, 1, 2], 3), [1.5, -1.5, 0])
    # RLOO [1,0,0,1]: 1 - (0+0+1)/3 = 2/3 ; 0 - (1+0+1)/3 = -2/3
    close(seq_adv("rloo", [1, 0, 0, 1], 4), [2 / 3, -2 / 3, -2 / 3, 2 / 3])


def test_nan_rewards_are_excluded():
    # valid [1, 0, 1]: mean 2/3 ; unbiased var = (2 * (1/3)^2 + (2/3)^2) / 2 = 1/3 ; std 0.5773503
    # A = (1/3) / 0.5773513 = 0.5773493 ; (-2/3) / 0.5773513 = -1.1546986 ; the NaN sample -> 0
    close(seq_adv("grpo", [1, NAN, 0, 1], 4), [0.5773493, 0, -1.1546986, 0.5773493])
    # a group with a single valid sample -> 0 ; an all-NaN group -> 0
    for est in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
        a = seq_adv(est, [NAN, NAN, 1.0, NAN, NAN, NAN, NAN, NAN], 4)
        assert torch.isfinite(a).all() and torch.equal(a, torch.zeros(8)), est
    # Dr.GRPO with NaN: valid [1, 0, 1] mean 2/3 -> [1/3, 0, -2/3, 1/3]
    close(seq_adv("dr_grpo", [1, NAN, 0, 1], 4), [1 / 3, 0, -2 / 3, 1 / 3])
    # RLOO with NaN: 1 - (0+1)/2 = 0.5 ; 0 - (1+1)/2 = -1
    close(seq_adv("rloo", [1, NAN, 0, 1], 4), [0.5, 0, -1, 0.5])


def test_reinforce_pp_baseline_values():
    # groups [1,0,0,1], [1,1,0,1]; group-centred: [.5,-.5,-.5,.5], [.25,.25,-.75,.25]
    # batch mean 0 ; unbiased var = (4 * .25 + 3 * .0625 + .5625) / 7 = 1.75 / 7 = .25 -> std .5
    # A = x / (0.5 + 1e-6)
    x = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, -0.75, 0.25])
    close(seq_adv("reinforce_pp_baseline", [1, 0, 0, 1, 1, 1, 0, 1], 4), x / 0.500001)
    # token-weighted whitening: G = 2, groups [1, 0] and [1, 1]; lengths [2, 1, 1, 1]
    # centred x = [.5, -.5, 0, 0] ; token weights 2,1,1,1 (5 tokens)
    # mean = (2*.5 - .5) / 5 = .1 ; var = (2*.4^2 + .6^2 + 2*.1^2) / (5-1) = .7/4 = .175
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    adv = advantages("reinforce_pp_baseline", torch.tensor([1.0, 0.0, 1.0, 1.0]), 2, mask)
    s = math.sqrt(0.175) + 1e-6
    close(adv, [[0.4 / s, 0.4 / s], [-0.6 / s, 0], [-0.1 / s, 0], [-0.1 / s, 0]])


def test_advantages_broadcast_over_mask_and_dtype():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [True, True, True], [0, 0, 0]], dtype=torch.bool)
    adv = advantages("dr_grpo", torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, mask)
    assert adv.shape == (4, 3) and adv.dtype == torch.float32
    close(adv, [[0.5, 0.5, 0], [-0.5, 0, 0], [-0.5, -0.5, -0.5], [0, 0, 0]])


def test_advantage_errors():
    r, m = torch.zeros(6), torch.ones(6, 2)
    with pytest.raises(ValueError, match="grpo.*rloo|dr_grpo"):
        advantages("ppo", r, 3, m)
    with pytest.raises(ValueError, match="divisible"):
        advantages("grpo", r, 4, m)
    with pytest.raises(ValueError, match="std"):
        advantages("grpo", r, 3, m, std="sample")
    with pytest.raises(ValueError, match="inf"):
        advantages("grpo", torch.tensor([1.0, math.inf, 0.0]), 3, torch.ones(3, 2))
    with pytest.raises(ValueError, match="response_mask"):
        advantages("grpo", r, 3, torch.ones(5, 2))


def test_process_advantages_values():
    # G = 2, T = 5. sample 0: step rewards [1, 0] ending at tokens [1, 3]; sample 1: [0] ending at 2.
    # all steps R = [1, 0, 0]: mean 1/3 ; unbiased var = ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3, std 0.5773503
    # normalised: 1 -> (2/3) / (std + eps) = a ; 0 -> -(1/3) / (std + eps) = b
    s = math.sqrt(1 / 3) + 1e-6
    a, b = (2 / 3) / s, -(1 / 3) / s  # 1.1546986, -0.5773493
    # sample 0: t=0,1 -> a + b ; t=2,3 -> b ; t=4 -> 0. sample 1: t=0..2 -> b ; t=3,4 -> 0
    adv = process_adv([[1.0, 0.0], [0.0]], [[1, 3], [2]], 2, 5)
    close(adv, [[a + b, a + b, b, b, 0], [b, b, b, 0, 0]])
    assert adv.dtype == torch.float32
    # population std: var = 2/9 ; std = 0.4714045
    sp = math.sqrt(2 / 9) + 1e-6
    adv = process_adv([[1.0, 0.0], [0.0]], [[1, 3], [2]], 2, 5, std="population")
    close(adv[0, 0], (2 / 3) / sp - (1 / 3) / sp)
    # a group whose step rewards are all equal -> 0; an empty sample -> 0
    adv = process_adv([[1.0, 1.0], [], [1.0, NAN], [0.0, 1.0]], [[0, 2], [], [1, 2], [0, 1]], 2, 3)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    # second group: valid R = [1, 0, 1] -> normalised 0.5773493, -1.1546986, 0.5773493 (NaN step -> 0)
    close(adv[2], [0.5773493, 0.5773493, 0.0])
    close(adv[3], [-1.1546986 + 0.5773493, 0.5773493, 0.0])


def test_process_advantages_errors():
    with pytest.raises(ValueError, match=r"\[0, T"):
        process_adv([[1.0], [0.0]], [[5], [0]], 2, 5)
    with pytest.raises(ValueError, match="non-decreasing"):
        process_adv([[1.0, 0.0], [0.0]], [[3, 1], [0]], 2, 5)
    with pytest.raises(ValueError, match="step ends"):
        process_adv([[1.0, 0.0], [0.0]], [[1], [0]], 2, 5)
    with pytest.raises(ValueError, match="divisible"):
        process_adv([[1.0]] * 3, [[0]] * 3, 2, 5)


# --------------------------------------------------------------------------------------------
# KL, surrogate, aggregation, policy loss: exact values
# --------------------------------------------------------------------------------------------


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    # k3: d = logp - ref = [0.5, -1] ; exp(-0.5) + 0.5 - 1 = 0.1065307 ; exp(1) - 1 - 1 = 0.7182818
    close(grpo.kl_estimate(logp, ref, "k3"), [0.1065307, 0.7182818])
    close(grpo.kl_estimate(logp, ref), [0.1065307, 0.7182818])
    # k1 = d = [0.5, -1] ; k2 = d^2 / 2 = [0.125, 0.5]
    close(grpo.kl_estimate(logp, ref, "k1"), [0.5, -1.0])
    close(grpo.kl_estimate(logp, ref, "k2"), [0.125, 0.5])
    # clamp: d = -1000 -> -20 ; k3 = exp(20) - 20 - 1 (finite)
    close(grpo.kl_estimate(torch.tensor([-1000.0]), torch.tensor([0.0])), [math.exp(20) - 21], atol=1e2)
    with pytest.raises(ValueError, match="k1"):
        grpo.kl_estimate(logp, ref, "k4")


def test_clipped_surrogate_design_values():
    # A=1,rho=1.5: -min(1.5, 1.28) = -1.28 ; A=-1,rho=1.5: -min(-1.5, -1.28) = 1.5
    # A=1,rho=0.5: -min(0.5, 0.8) = -0.5 ; A=-1,rho=0.5: -min(-0.5, -0.8) = 0.8
    loss = grpo.clipped_surrogate(torch.tensor([1.5, 1.5, 0.5, 0.5]), torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.2, 0.28)
    close(loss, [-1.28, 1.5, -0.5, 0.8])


def test_dual_clip():
    # c = 3. A=-1,rho=5: max(5, 1.28) = 5 -> min(5, 3*1) = 3 ; A=-1,rho=1.1: 1.1 (< 3, unchanged)
    # A=+1,rho=5: -1.28 (dual clip only acts on A < 0) ; A=-2,rho=4: max(8, 2.56) = 8 -> min(8, 6) = 6
    loss = grpo.clipped_surrogate(
        torch.tensor([5.0, 1.1, 5.0, 4.0]), torch.tensor([-1.0, -1.0, 1.0, -2.0]), 0.2, 0.28, dual_clip=3.0
    )
    close(loss, [3.0, 1.1, -1.28, 6.0])
    with pytest.raises(ValueError, match="dual_clip"):
        grpo.clipped_surrogate(torch.ones(2), torch.ones(2), 0.2, 0.28, dual_clip=0.5)


def test_aggregation_modes():
    pt = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    kw = dict(num_tokens=3, num_seqs=2, max_len=4)
    # token_mean: (1 + 2 + 4) / 3 = 7/3
    close(grpo.aggregate_loss(pt, m, "token_mean", **kw), 7 / 3)
    # seq_mean_token_mean: ((1 + 2)/2 + 4/1) / 2 = 2.75
    close(grpo.aggregate_loss(pt, m, "seq_mean_token_mean", **kw), 2.75)
    # seq_mean_token_sum_norm: 7 / (2 * 4) = 0.875
    close(grpo.aggregate_loss(pt, m, "seq_mean_token_sum_norm", **kw), 0.875)
    # global normalisers: this micro-batch is one part of a mini-batch of 10 tokens, 5 sequences
    close(grpo.aggregate_loss(pt, m, "token_mean", num_tokens=10, num_seqs=5, max_len=4), 0.7)
    # NaN in masked positions does not leak
    pt_nan = pt.clone()
    pt_nan[0, 2] = NAN
    close(grpo.aggregate_loss(pt_nan, m, "seq_mean_token_mean", **kw), 2.75)
    with pytest.raises(ValueError, match="token_mean"):
        grpo.aggregate_loss(pt, m, "sum", **kw)


def test_policy_loss_token_level_values_and_metrics():
    # same numbers as the design check, one token per sequence, rho = exp(logp - old)
    rho = torch.tensor([[1.5], [1.5], [0.5], [0.5]])
    old = torch.zeros(4, 1)
    logp = rho.log().requires_grad_(True)
    adv = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    loss, met = ploss(logp, old, adv, torch.ones(4, 1), num_tokens=4, num_seqs=4, max_len=1)
    # token_mean: (-1.28 + 1.5 - 0.5 + 0.8) / 4 = 0.13
    close(loss, 0.13)
    close(met["pg_loss"], 0.13)
    # clip_frac_low: A<0 and rho<0.8 -> token 4 -> 1/4 ; clip_frac_high: A>0 and rho>1.28 -> token 1 -> 1/4
    close(met["clip_frac_low"], 0.25)
    close(met["clip_frac_high"], 0.25)
    close(met["ratio_mean"], 1.0)
    # approx_kl_old: k3 with d = log rho: exp(-d) + d - 1 ; mean over 4 tokens
    d = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5]))
    close(met["approx_kl_old"], (torch.exp(-d) + d - 1).mean())
    close(met["kl_loss"], 0.0)
    assert all(not v.requires_grad and v.dim() == 0 for v in met.values())
    loss.backward()
    # gradient of the unclipped tokens: d/dlogp of -rho*A / 4 = -rho*A/4 ; clipped tokens: 0
    close(logp.grad, [[0.0], [0.375], [-0.125], [0.0]])


def test_policy_loss_gspo_sequence_ratio():
    # one sequence, log-ratios [0.2, 0.4, (masked 5.0)] -> s = exp((0.2 + 0.4) / 2) = exp(0.3) = 1.3498588
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.2, 0.4, 5.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.ones(1, 3)
    kw = dict(ratio_level="sequence", loss_agg="seq_mean_token_mean", num_tokens=2, num_seqs=1, max_len=3)
    # clip_high 0.28: s > 1.28 and A > 0 -> clipped: loss = -1.28 on each token, mean -1.28, no gradient
    loss, met = ploss(logp, old, adv, mask, clip_high=0.28, **kw)
    close(loss, -1.28)
    close(met["ratio_mean"], math.exp(0.3))
    close(met["clip_frac_high"], 1.0)
    # clip_high 0.4: not clipped, loss = -s ; gradient per token = -s / |o| = -1.3498588 / 2 = -0.6749294
    # (GSPO: d/dlogp_t of -exp(mean_t lr) = -s / |o|), masked token: 0
    loss, _ = ploss(logp, old, adv, mask, clip_high=0.4, **kw)
    close(loss, -math.exp(0.3))
    loss.backward()
    close(logp.grad, [[-math.exp(0.3) / 2, -math.exp(0.3) / 2, 0.0]])


def test_policy_loss_tis_weight():
    # old = 0, sampling = [-1, 0.5] -> exp(old - sampling) = [e, exp(-0.5)] = [2.7182818, 0.6065307]
    # cap 2 -> w = [2, 0.6065307]. logp = old (rho = 1), A = 1: surrogate -1 -> weighted [-2, -0.6065307]
    # token_mean over 2 tokens: -1.3032653 ; tis_weight_mean 1.3032653
    logp = torch.zeros(1, 2, requires_grad=True)
    loss, met = ploss(
        logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
        sampling_logp=torch.tensor([[-1.0, 0.5]]), tis_cap=2.0, num_tokens=2, num_seqs=1, max_len=2,
    )
    close(loss, -1.3032653)
    close(met["tis_weight_mean"], 1.3032653)
    loss.backward()
    # gradient = -w * A * rho / 2 = [-1, -0.3032653]
    close(logp.grad, [[-1.0, -0.3032653]])
    with pytest.raises(ValueError, match="sampling_logp"):
        ploss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2),
                         tis_cap=2.0, num_tokens=2, num_seqs=1, max_len=2)


def test_policy_loss_kl_in_loss():
    # rho = 1, A = 0 -> surrogate 0. logp = [-1, -2], ref = [-1.5, -1], k3 = [0.1065307, 0.7182818]
    # kl_coef 0.1, token_mean over 2: 0.1 * (0.1065307 + 0.7182818) / 2 = 0.04124063
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]])
    loss, met = ploss(
        logp, logp.detach(), torch.zeros(1, 2), torch.ones(1, 2), ref_logp=ref, kl_coef=0.1,
        num_tokens=2, num_seqs=1, max_len=2,
    )
    close(loss, 0.04124063)
    close(met["kl_ref"], 0.41240625)
    close(met["kl_loss"], 0.04124063)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): [1 - exp(-0.5), 1 - e] = [0.3934693, -1.7182818]; * 0.1 / 2
    close(logp.grad, [[0.01967347, -0.08591409]])
    with pytest.raises(ValueError, match="ref_logp"):
        ploss(logp, logp.detach(), torch.zeros(1, 2), torch.ones(1, 2), kl_coef=0.1,
                         num_tokens=2, num_seqs=1, max_len=2)


def test_policy_loss_finite_gradients_with_huge_log_ratios():
    B, T = 4, 3
    old = torch.zeros(B, T)
    logp = torch.tensor([[100.0, -100.0, 0.1]] * B, requires_grad=True)
    adv = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]).expand(B, T)
    ref = torch.full((B, T), -100.0)
    mask = torch.ones(B, T)
    for level in ("token", "sequence"):
        for agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
            logp.grad = None
            loss, met = ploss(
                logp, old, adv, mask, ratio_level=level, sampling_logp=old - 100.0, tis_cap=2.0,
                ref_logp=ref, kl_coef=0.05, dual_clip=3.0, loss_agg=agg, num_tokens=12, num_seqs=4, max_len=3,
            )
            loss.backward()
            assert torch.isfinite(loss), (level, agg)
            assert torch.isfinite(logp.grad).all(), (level, agg)
            assert all(torch.isfinite(v) for v in met.values()), (level, agg, met)


def test_policy_loss_padding_with_nan_is_harmless():
    logp = torch.tensor([[-1.0, NAN], [-2.0, -math.inf]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    nan_pad = torch.tensor([[-1.2, NAN], [-1.9, NAN]])
    loss, met = ploss(
        logp, nan_pad, torch.tensor([[1.0, NAN], [-1.0, NAN]]), mask, sampling_logp=nan_pad, tis_cap=2.0,
        ref_logp=nan_pad, kl_coef=0.1, num_tokens=2, num_seqs=2, max_len=2,
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert logp.grad[:, 1].eq(0).all()
    assert all(torch.isfinite(v) for v in met.values())


def test_policy_loss_errors():
    z = torch.zeros(2, 3)
    kw = dict(num_tokens=1, num_seqs=1, max_len=1)
    with pytest.raises(ValueError, match="unknown policy loss 'nope'.*gspo.*ppo_clip"):
        grpo.policy_loss(grpo.LossInputs(z, z, z, z), PolicyLossConfig(name="nope"), grpo.LossNorm("token_mean", 1, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        ploss(z, torch.zeros(2, 4), z, z, **kw)
    with pytest.raises(ValueError, match="aggregation"):
        ploss(z, z, z, z, loss_agg="mean", **kw)
    with pytest.raises(ValueError, match="dual_clip"):
        PPOClipLoss(dual_clip=0.5)


# --------------------------------------------------------------------------------------------
# entropy, reward shaping, statistics
# --------------------------------------------------------------------------------------------


def test_entropy_from_logits():
    # uniform over 4 -> log 4 ; one-hot-ish (1e4 gap) -> 0 ; [0, -inf, 0] -> log 2
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1e4, 0.0, 0.0, 0.0], [0.0, -math.inf, 0.0, 3.0]]])
    ent = grpo.entropy_from_logits(logits)
    assert ent.shape == (1, 3)
    p = torch.softmax(torch.tensor([0.0, 0.0, 3.0]), 0)
    close(ent, [[math.log(4), 0.0, float(-(p * p.log()).sum())]])
    # against the textbook formula on random logits, and bf16 input goes through float32
    z = torch.randn(2, 5, 11, dtype=torch.float64) * 3
    pz = z.softmax(-1)
    close(grpo.entropy_from_logits(z), -(pz * pz.log()).sum(-1))
    assert grpo.entropy_from_logits(z.to(torch.bfloat16)).dtype == torch.float32
    # gradient with -inf logits is finite
    zz = torch.tensor([[[0.0, -math.inf, 1.0]]], requires_grad=True)
    grpo.entropy_from_logits(zz).sum().backward()
    assert torch.isfinite(zz.grad).all()


def test_sequence_kl_for_kl_in_the_reward():
    # sample 0: k1 sum over mask of d = logp - ref = [0.5, -1] -> -0.5 ; r' = 1 - 0.1 * (-0.5) = 1.05
    # sample 1: only token 0 counts: d = 0.5 -> r' = 0 - 0.1 * 0.5 = -0.05 ; NaN stays NaN
    old = torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0], [-1.5, -1.0], [-1.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    close(grpo.sequence_kl(old, ref, mask, "k1"), [-0.5, 0.5, -0.5])
    out = torch.tensor([1.0, 0.0, NAN]) - 0.1 * grpo.sequence_kl(old, ref, mask, "k1")
    close(out[:2], [1.05, -0.05])
    assert math.isnan(out[2])
    # k3: 1 - 0.1 * (0.1065307 + 0.7182818) = 0.9175187
    close(1.0 - 0.1 * grpo.sequence_kl(old, ref, mask, "k3")[0], 0.9175187)
    with pytest.raises(ValueError, match="shape"):
        grpo.sequence_kl(old, ref[:, :1], mask, "k1")


def test_informative_group_rule():
    r = [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, NAN, 1.0, NAN, NAN]
    # groups of 3: [1,1,1] constant ; [0,1,0] mixed ; [.5,.5,NaN] constant ; [1,NaN,NaN] single valid
    assert [grpo.informative(r[k:k + 3]) for k in range(0, 12, 3)] == [False, True, False, False]
    # the vectorised rule of the estimators agrees: informative groups get non-zero GRPO advantages
    adv = seq_adv("grpo", r, 3)
    assert [bool(adv[k:k + 3].abs().sum() > 0) for k in range(0, 12, 3)] == [False, True, False, False]
    assert grpo.informative([None, 2.0, 3.0]) and not grpo.informative([])


def test_overlong_penalty():
    # max_len 10, buffer 4, penalty 1: L <= 6 -> 0 ; L = 8 -> (6 - 8) / 4 = -0.5 ; L = 7 -> -0.25
    # L = 10 -> (6 - 10) / 4 = -1 ; L = 11 -> -1 ; penalty 0.5 scales: L = 8 -> -0.25
    L = torch.tensor([3, 6, 7, 8, 10, 11])
    close(grpo.overlong_penalty(L, 10, 4, 1.0), [0, 0, -0.25, -0.5, -1, -1])
    close(grpo.overlong_penalty(L, 10, 4, 0.5), [0, 0, -0.125, -0.25, -0.5, -0.5])
    # buffer 0: only L > max_len is punished
    close(grpo.overlong_penalty(L, 10, 0, 1.0), [0, 0, 0, 0, 0, -1])
    with pytest.raises(ValueError, match="buffer"):
        grpo.overlong_penalty(L, 10, 11, 1.0)


def test_group_stats_and_message():
    s = grpo.group_stats(torch.tensor([1.0, 1.0, 0.0, 1.0, NAN, 0.0]), 2)
    # groups [1,1] constant, [0,1] mixed, [NaN,0] single valid -> 2/3 zero variance
    assert s["zero_variance_frac"] == pytest.approx(2 / 3)
    # valid [1,1,0,1,0]: mean 0.6 ; population std sqrt(0.24) = 0.4898979
    assert s["reward_mean"] == pytest.approx(0.6)
    assert s["reward_std"] == pytest.approx(math.sqrt(0.24))
    assert s["valid_frac"] == pytest.approx(5 / 6)
    msg = grpo.ZERO_VARIANCE_MESSAGE.lower()
    for word in ("0", "temperature", "group size", "dynamic sampling", "same reward"):
        assert word in msg


# --------------------------------------------------------------------------------------------
# hypothesis property tests
# --------------------------------------------------------------------------------------------

reward_value = st.one_of(
    st.sampled_from([0.0, 1.0, 0.5, NAN]),
    st.floats(min_value=-10, max_value=10, allow_nan=False, width=32),
)


@st.composite
def grouped_rewards(draw):
    G = draw(st.integers(1, 6))
    N = draw(st.integers(1, 5))
    return draw(st.lists(reward_value, min_size=N * G, max_size=N * G)), G


@PROPS
@given(grouped_rewards(), st.sampled_from(["grpo", "dr_grpo", "rloo"]), st.sampled_from(["unbiased", "population"]))
def test_prop_group_advantages_sum_to_zero(rg, estimator, std):
    rewards, G = rg
    a = seq_adv(estimator, rewards, G, std=std).double()
    assert torch.isfinite(a).all()
    for k in range(len(rewards) // G):
        grp = rewards[k * G:(k + 1) * G]
        ak = a[k * G:(k + 1) * G]
        valid = [x for x in grp if not math.isnan(x)]
        for x, ai in zip(grp, ak):
            if math.isnan(x):
                assert ai == 0.0
        if len(set(valid)) >= 2:
            scale = max(1.0, float(ak.abs().max()))
            assert abs(float(ak.sum())) <= 1e-5 * scale * G
        else:
            assert torch.equal(ak, torch.zeros(G, dtype=ak.dtype))


def slow_grpo(rewards, G, eps, unbiased):
    out = []
    for k in range(len(rewards) // G):
        grp = rewards[k * G:(k + 1) * G]
        valid = [x for x in grp if not math.isnan(x)]
        n = len(valid)
        if n < 2 or len(set(valid)) < 2:
            out += [0.0] * G
            continue
        mean = sum(valid) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in valid) / (n - 1 if unbiased else n))
        out += [0.0 if math.isnan(x) else (x - mean) / (sd + eps) for x in grp]
    return out


@PROPS
@given(grouped_rewards(), st.sampled_from([1e-6, 1e-4, 0.1]), st.booleans())
def test_prop_vectorised_grpo_equals_loop(rg, eps, unbiased):
    rewards, G = rg
    rewards = [float(torch.tensor(x, dtype=torch.float32)) for x in rewards]  # what the tensor holds
    a = seq_adv("grpo", rewards, G, eps=eps, std="unbiased" if unbiased else "population")
    close(a, slow_grpo(rewards, G, eps, unbiased), atol=1e-4)


@st.composite
def loss_batch(draw):
    B = draw(st.integers(1, 8))
    T = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    per_token = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) < 0.7).double()
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, B - 1)), max_size=4)))) if B > 1 else []
    return per_token, mask, cuts


AGG = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]


@PROPS
@given(loss_batch(), st.sampled_from(AGG))
def test_prop_aggregate_invariant_to_micro_batch_split(batch, mode):
    per_token, mask, cuts = batch
    B = per_token.shape[0]
    kw = dict(num_tokens=float(mask.sum()), num_seqs=float(B), max_len=per_token.shape[1] + 3)
    full = grpo.aggregate_loss(per_token, mask, mode, **kw)
    bounds = [0, *cuts, B]
    parts = sum(grpo.aggregate_loss(per_token[a:b], mask[a:b], mode, **kw) for a, b in zip(bounds, bounds[1:]))
    close(parts, full, atol=1e-9)


@PROPS
@given(loss_batch(), st.sampled_from(AGG), st.integers(1, 4), st.sampled_from(["token", "sequence"]))
def test_prop_padding_columns_do_not_change_loss(batch, mode, extra, level):
    per_token, mask, _ = batch
    B, T = per_token.shape
    g = torch.Generator().manual_seed(B * 31 + T)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = old + 0.3 * per_token
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = old - 0.1
    kw = dict(loss_agg=mode, ratio_level=level, num_tokens=float(mask.sum()), num_seqs=float(B), max_len=T + 4,
              ref_logp=None, kl_coef=0.1, tis_cap=2.0, dual_clip=3.0)

    def pad(x, value):
        return torch.cat([x, torch.full((B, extra), value, dtype=x.dtype)], dim=1)

    kw0 = dict(kw, ref_logp=ref)
    l0, m0 = ploss(logp, old, adv, mask, sampling_logp=old - 0.05, **kw0)
    kw1 = dict(kw, ref_logp=pad(ref, 7.0))
    l1, m1 = ploss(pad(logp, 5.0), pad(old, -9.0), pad(adv, 3.0), pad(mask, 0.0),
                              sampling_logp=pad(old - 0.05, 2.0), **kw1)
    close(l1, l0, atol=1e-9)
    for k in m0:
        close(m1[k], m0[k], atol=1e-6)
    close(grpo.aggregate_loss(pad(per_token, 1e3), pad(mask, 0.0), mode, num_tokens=3.0, num_seqs=B, max_len=9),
          grpo.aggregate_loss(per_token, mask, mode, num_tokens=3.0, num_seqs=B, max_len=9), atol=1e-9)


def test_policy_loss_bf16_logp_is_computed_in_float32():
    logp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    loss, met = ploss(logp, logp.detach().float() - 0.1, torch.ones(1, 2), torch.ones(1, 2),
                                 num_tokens=2, num_seqs=1, max_len=2)
    # rho = exp(0.1) = 1.1051709 (< 1.28, unclipped) -> loss = -1.1051709 (bf16 input rounding ~1e-2)
    assert loss.dtype == torch.float32
    close(loss, -math.exp(0.1), atol=2e-2)
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16 and torch.isfinite(logp.grad.float()).all()


def test_online_rft_is_one_for_a_correct_sample_and_zero_otherwise():
    """DeepSeekMath's Online RFT coefficient: no baseline, so an all-correct group trains on every sample."""
    close(seq_adv("online_rft", [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 4), [1, 0, 1, 1, 1, 1, 1, 1])
    close(seq_adv("online_rft", [0.5, NAN, 1.2, 0.9], 4), [0, 0, 1, 0])
    from troupe.configs.algos import OnlineRFTAdvantage
    from troupe.learner.advantages import compute_advantages
    from troupe.learner.registry import AdvantageInputs

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = compute_advantages(AdvantageInputs(torch.tensor([0.6, 0.4]), mask, 2), OnlineRFTAdvantage(correct_at=0.5))
    assert torch.equal(adv, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_on_policy_distillation_is_the_teacher_minus_student_log_prob_on_every_token():
    """GKD / on-policy distillation: A_t = log pi_teacher - log pi_student (given by the ranks as token_rewards), 0 on
    masked tokens and excluded samples; reward_weight mixes in GRPO's advantage of the task reward."""
    from troupe.configs.algos import OnPolicyDistillAdvantage
    from troupe.learner.advantages import compute_advantages
    from troupe.learner.registry import AdvantageInputs

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    gap = torch.tensor([[-0.5, 0.2, 9.0], [0.0, -1.0, 0.3], [0.1, 9.0, 9.0], [2.0, 2.0, 2.0]])
    rewards = torch.tensor([1.0, 0.0, NAN, 1.0])
    inp = AdvantageInputs(rewards, mask, 2, token_rewards=gap)
    adv = compute_advantages(inp, OnPolicyDistillAdvantage(teacher="t"))
    assert torch.equal(adv, torch.tensor([[-0.5, 0.2, 0.0], [0.0, -1.0, 0.3], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]]))
    mixed = compute_advantages(inp, OnPolicyDistillAdvantage(teacher="t", reward_weight=0.5))
    grpo_adv = advantages("grpo", rewards, 2, mask)
    assert torch.allclose(mixed, adv + 0.5 * grpo_adv)
    with pytest.raises(ValueError, match="teacher"):
        compute_advantages(AdvantageInputs(rewards, mask, 2), OnPolicyDistillAdvantage(teacher="t"))
