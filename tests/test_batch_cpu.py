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
