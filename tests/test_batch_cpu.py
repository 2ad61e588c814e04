"""Collation of scored groups into the padded TrainBatch, and the per-mini-batch loss denominators."""

from __future__ import annotations

import math

import pytest
import torch

from troupe.core.types import Group, Prompt, Sample
from troupe.learner.batch import collate_groups, response_logprobs
from troupe.learner.losses import LossNorm
from troupe.learner.step import minibatch_norms


def _group(prompt_ids, responses, rewards, truncated=None):
    truncated = truncated or [False] * len(responses)
    samples = [Sample(r, [-0.5] * len(r), "", t, 0) for r, t in zip(responses, truncated)]
    return Group(Prompt(0, "", prompt_ids, "q", "1"), samples, rewards=rewards)


def test_layout_left_pads_prompts_and_right_pads_responses():
    g1 = _group([11, 12], [[21], [22, 23, 24]], [1.0, 0.0])
    g2 = _group([13, 14, 15], [[25, 26], []], [None, 0.5])
    b = collate_groups([g1, g2], pad_id=0)
    assert b.prompt_len == 3 and b.response_len == 3 and b.size == 4
    assert b.input_ids.tolist() == [
        [0, 11, 12, 21, 0, 0],
        [0, 11, 12, 22, 23, 24],
        [13, 14, 15, 25, 26, 0],
        [13, 14, 15, 0, 0, 0],
    ]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    # the excluded sample (reward None) has no loss tokens and a NaN reward
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    assert b.rewards[0] == 1.0 and math.isnan(b.rewards[2]) and b.rewards[3] == 0.5
    assert b.sampling_logprobs[1].tolist() == [-0.5, -0.5, -0.5]


def test_mask_truncated_drops_truncated_responses_from_the_loss():
    g = _group([1], [[2, 3], [4, 5]], [1.0, 0.0], truncated=[True, False])
    assert collate_groups([g], 0).response_mask.tolist() == [[1, 1], [1, 1]]
    assert collate_groups([g], 0, mask_truncated=True).response_mask.tolist() == [[0, 0], [1, 1]]


def test_mismatched_logprobs_is_an_error():
    g = _group([1], [[2, 3]], [1.0])
    g.samples[0].sampling_logprobs = [-1.0]
    with pytest.raises(ValueError, match="2 ids but 1 logprobs"):
        collate_groups([g], 0)


def test_response_logprobs_aligns_logits_with_response_tokens():
    # vocabulary of 3; logits at position p predict token p+1
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 3)
    ids = torch.tensor([[0, 2, 1, 0]])  # prompt [0, 2] (P=2), response [1, 0]
    lp = response_logprobs(logits, ids, prompt_len=2)
    want = [logits[0, 1].log_softmax(-1)[1], logits[0, 2].log_softmax(-1)[0]]
    assert torch.allclose(lp[0], torch.stack(want))
    lp_t = response_logprobs(logits, ids, prompt_len=2, temperature=2.0)
    assert torch.allclose(lp_t[0, 0], (logits[0, 1] / 2).log_softmax(-1)[1])


def test_minibatch_denominators_count_all_ranks():
    # 2 ranks x 2 mini-batches x 2 rows; tokens per row: 1, 2, 0, 3 | 4, 0, 1, 1
    lens = [1, 2, 0, 3, 4, 0, 1, 1]
    responses = [[5] * n for n in lens]
    g = _group([1], responses, [1.0] * 8)
    b = collate_groups([g], 0)
    d = minibatch_norms(b.response_mask, num_ranks=2, mini_batches=2, mode="token_mean", max_len=4)
    # mini-batch 0 = rows {0,1} of rank 0 and rows {4,5} of rank 1; mini-batch 1 = {2,3} and {6,7}
    assert d == [LossNorm("token_mean", 7.0, 3.0, 4), LossNorm("token_mean", 5.0, 3.0, 4)]


# ------------------------------------------------------------------ chunked log-probs and entropy (issue 26)


def _unchunked(logits, ids, P, temp):
    from troupe.learner.batch import response_logprobs
    from troupe.learner.losses import entropy_from_logits

    lp = response_logprobs(logits, ids, P, temp)
    T = ids.shape[1] - P
    ent = entropy_from_logits(logits[:, P - 1:P - 1 + T].float().detach() / temp)
    return lp, ent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [0, 1, 7, 1024])
def test_chunked_logprobs_and_entropy_equal_the_unchunked_ones_bit_for_bit(dtype, chunk):
    from troupe.learner.batch import chunked_response_logprobs

    g = torch.Generator().manual_seed(0)
    B, P, T, V, temp = 3, 4, 5, 37, 0.7
    ids = torch.randint(0, V, (B, P + T), generator=g)
    base = (3 * torch.randn(B, P + T, V, generator=g)).to(dtype)
    weights = torch.randn(B, T, generator=g)
    results = []
    for fn in (lambda z: _unchunked(z, ids, P, temp),
               lambda z: chunked_response_logprobs(z, ids, P, temp, chunk_tokens=chunk, with_entropy=True)):
        z = base.clone().requires_grad_(True)
        lp, ent = fn(z)
        (lp * weights).sum().backward()
        results.append((lp.detach(), ent, z.grad))
    (lp0, ent0, grad0), (lp1, ent1, grad1) = results
    assert lp1.shape == ent1.shape == (B, T) and lp1.dtype == torch.float32
    assert torch.equal(lp0, lp1) and torch.equal(ent0, ent1) and torch.equal(grad0, grad1)
    assert not ent1.requires_grad


def test_chunked_logprobs_keep_no_float32_copy_of_the_logits_for_backward():
    """Autograd keeps only the model's bfloat16 logits (views of them, and small per-position tensors): the
    bytes saved for backward besides the logits are under a tenth of a float32 copy of the response logits;
    the unchunked path keeps at least one."""
    from troupe.learner.batch import chunked_response_logprobs

    B, P, T, V = 2, 3, 64, 512
    ids = torch.randint(0, V, (B, P + T))
    logits = torch.randn(B, P + T, V).to(torch.bfloat16).requires_grad_(True)
    f32_copy = B * T * V * 4

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):  # by storage: a view of the logits shares theirs and costs nothing
            key = t.untyped_storage().data_ptr()
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        seen.pop(logits.untyped_storage().data_ptr(), None)
        return sum(seen.values())

    chunked = saved_bytes(lambda: chunked_response_logprobs(logits, ids, P, chunk_tokens=16)[0].sum())
    whole = saved_bytes(lambda: _unchunked(logits, ids, P, 1.0)[0].sum())
    assert chunked < f32_copy / 10 and f32_copy <= whole, (chunked, whole, f32_copy)


def test_chunk_tokens_must_not_be_negative():
    from troupe.learner.batch import chunked_response_logprobs

    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_response_logprobs(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), 1, chunk_tokens=-1)
