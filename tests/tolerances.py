"""Tolerances for tests that compare two runs of the same maths done in another float32 order.

Two runs that differ only in how a step's sums are split (1 rank with micro-batches vs 2 ranks, ZeRO-2
vs ZeRO-3, token-budget micro-batches) compute the same real numbers; what differs is the order of
float32 additions (micro-batch sums, all-reduce trees, BLAS blocking, which also differs between
CPUs: an AVX-512 kernel on one Xeon, another on an EPYC). Each bound below comes from that arithmetic,
not from one machine's observed difference, so it holds on any machine:

- A sum of n terms in any order is within ``gamma(n) * sum |x_i|`` of the exact sum (Higham,
  *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 / eq. 3.5, unit roundoff
  u = 2**-24 for float32). Two runs each within that of the exact value differ by at most twice it.
  For a sum of non-negative terms (a token-mean NLL, a squared norm) ``sum |x_i| = |sum x_i|``: the
  bound is relative.
- AdamW's step per element has ``|lr * m_hat / (sqrt(v_hat) + eps)| <= lr * max(1, (1 - b1) /
  sqrt(1 - b2))`` (Kingma & Ba 2015, section 2.1). So a weight whose exact gradient is 0 (its computed
  gradient is pure rounding noise, which Adam normalises into full-size steps of either sign) can end
  up anywhere within ``2 * sum_t lr_t * that factor`` in two runs. ``ZERO_GRADIENT_BY_SYMMETRY`` names
  those weights: the attention key bias adds ``q . b`` to every score of a query row, and softmax is
  invariant to a constant shift, so its exact gradient is 0. (This is the weight that differed by
  1.04e-6 between 2 ranks and 1 rank on an Intel Xeon, issue 23; it differs by 5.9e-7 on an AMD EPYC.)
- Every other weight's gradient has a relative error of at most ``2 gamma(n)`` (n from
  ``reduction_terms``: the step's tokens plus the widest reduction once per matrix product it passes), Adam's update is scale
  invariant to first order, so the update differs by at most ``lr_t * 4 gamma(n)`` per step (the factor
  2 for m_hat and sqrt(v_hat) each), plus one rounding of ``w + step`` per step in each run
  (``2 * ulp(|w|)``). This assumes no cancellation inside the gradient of that weight (condition
  number ~1); the key bias above is the exact case where it does not hold.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

U32 = 2.0 ** -24  # float32 unit roundoff
ZERO_GRADIENT_BY_SYMMETRY = ("self_attn.k_proj.bias",)


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float32: the relative error bound of an n-term sum."""
    if n * U32 >= 1:
        raise ValueError(f"gamma({n}) undefined in float32: n u >= 1")
    return n * U32 / (1 - n * U32)


def sum_rtol(n: int) -> float:
    """Two float32 sums of the same n non-negative terms in different orders agree to this relative bound."""
    return 2 * gamma(n)


def loss_rtol(n_tokens: int, step: int, grad_norm: float, n_params: int, weight_atol: float, loss: float) -> float:
    """Relative bound on a step's token-mean loss in two split-equivalent runs.

    Step 1: the same n_tokens non-negative terms summed in another order (``sum_rtol``). Later steps add
    the effect of the weights' difference (at most ``weight_atol`` per element over n_params weights):
    ``|dL| <= ||grad L|| * ||dw|| <= grad_norm * sqrt(n_params) * weight_atol`` (Cauchy-Schwarz)."""
    rtol = sum_rtol(n_tokens)
    if step > 1:
        rtol += grad_norm * math.sqrt(n_params) * weight_atol / abs(loss)
    return rtol


def policy_loss_atol(n_tokens: int, max_abs_advantage: float, max_weight: float = 1.0) -> float:
    """Absolute bound on a one-step GRPO loss (token mean of ``A_t * rho_t * w_t``, signed terms) summed in two
    orders: ``2 gamma(n) * max|A| * max(rho * w)``; on-policy rho = 1, w <= the TIS cap."""
    return 2 * gamma(n_tokens) * max_abs_advantage * max_weight


def grad_norm_rtol(n_tokens: int, n_params: int) -> float:
    """Relative bound on the global gradient norm of two split-equivalent runs (one step): every gradient
    element within ``2 gamma(n_tokens)`` (relative), the sum of n_params squares within ``2 gamma(n_params)``;
    the square root halves the latter."""
    return 2 * gamma(n_tokens) + gamma(n_params)


def ulp32(x: float) -> float:
    """The float32 spacing at |x| (2**-149 at 0)."""
    x = abs(float(x))
    return 2.0 ** (math.floor(math.log2(x)) - 23) if x >= 2.0 ** -126 else 2.0 ** -149


def reduction_terms(tokens: int, widths: Sequence[int], depth: int) -> int:
    """The n to use in ``gamma(n)`` for a weight's gradient: a sum over the step's tokens of products whose
    factors come back through ``depth`` matrix products, each a sum over at most ``max(widths)`` terms; the
    relative errors of a chain of products of sums add (gamma_a + gamma_b <= gamma_(a+b))."""
    return int(tokens + depth * max(widths))


def adam_weight_atol(lrs: Sequence[float], n_terms: int, weight_scale: float = 1.0) -> float:
    """Elementwise bound on two split-equivalent AdamW runs' weights after ``len(lrs)`` steps (module docstring):
    ``sum_t lr_t * 4 gamma(n_terms) + steps * 2 ulp(weight_scale)``."""
    return sum(lrs) * 4 * gamma(n_terms) + len(lrs) * 2 * ulp32(weight_scale)


def adam_noise_atol(lrs: Sequence[float], betas: Sequence[float]) -> float:
    """Elementwise bound for a weight whose exact gradient is 0: each run's Adam steps are at most
    ``lr_t * max(1, (1 - b1) / sqrt(1 - b2))`` (Kingma & Ba 2015, 2.1), in any direction."""
    b1, b2 = betas
    return 2 * sum(lrs) * max(1.0, (1 - b1) / math.sqrt(1 - b2))


def assert_same_adam_weights(w: Mapping[str, "object"], ref: Mapping[str, "object"], *, lrs: Sequence[float],
                             n_terms: int, betas: Sequence[float]) -> None:
    """Every weight of ``w`` equals ``ref``'s within ``adam_weight_atol`` (``adam_noise_atol`` for the weights
    in ``ZERO_GRADIENT_BY_SYMMETRY``). Raises AssertionError naming the weight, its difference and the bound."""
    import torch

    assert w.keys() == ref.keys(), sorted(set(w) ^ set(ref))
    for k in ref:
        a, b = w[k].float(), ref[k].float()
        if any(k.endswith(s) for s in ZERO_GRADIENT_BY_SYMMETRY):
            atol = adam_noise_atol(lrs, betas)
        else:
            atol = adam_weight_atol(lrs, n_terms, float(b.abs().max()))
        diff = float((a - b).abs().max())
        assert diff <= atol, f"{k}: max |diff| {diff:.3e} > {atol:.3e} (float32 bound, tests/tolerances.py)"
        assert torch.isfinite(a).all(), k
