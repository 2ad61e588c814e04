"""How the learner cuts a step batch into micro-batches: token budgets, rank-equal counts, trimmed padding.

Pure functions of troupe.learner.batch (no DeepSpeed); the update's invariance to these choices on
real DeepSpeed ranks is in tests/test_learner_slow.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from troupe.core.types import Group, Prompt, Sample
from troupe.learner.batch import (
    collate_groups,
    micro_batch_plan,
    padding_share,
    token_budget_micro_batches,
    trim_padding,
)

PROPS = settings(max_examples=80, deadline=None, derandomize=True, database=None)


def _cost(P, T, mb):
    return len(mb) * (max(P[i] for i in mb) + max(max(1, T[i]) for i in mb))


def test_token_budget_packs_sorted_rows_within_the_budget():
    P = [3, 3, 3, 3, 3, 3]
    T = [2, 9, 4, 9, 1, 5]  # totals 5, 12, 7, 12, 4, 8
    mbs = token_budget_micro_batches(P, T, budget=24)
    # longest first (ties by index): 1, 3 (12 each) fit 2 x 12 = 24; then 5, 2 (8, 7): 2 x 8 = 16, + row 0
    # would be 3 x 8 = 24; + row 4 would be 4 x 8 = 32 > 24
    assert mbs == [[1, 3], [5, 2, 0], [4]]
    assert all(_cost(P, T, mb) <= 24 for mb in mbs)


def test_a_row_over_the_budget_goes_alone_and_width_counts_both_maxima():
    # row 0 alone is 10 + 10 = 20 > budget 8; rows 1 and 2: longest prompt 4 + longest response 3 = 7 per row
    mbs = token_budget_micro_batches([10, 4, 1], [10, 1, 3], budget=8)
    assert mbs == [[0], [1], [2]]  # rows 1+2 together would be 2 x (4 + 3) = 14 > 8
    assert token_budget_micro_batches([10, 4, 1], [10, 1, 3], budget=14) == [[0], [1, 2]]


def test_count_splits_the_largest_micro_batch_until_reached():
    P, T = [2] * 6, [2] * 6
    assert token_budget_micro_batches(P, T, budget=100) == [[0, 1, 2, 3, 4, 5]]
    assert token_budget_micro_batches(P, T, budget=100, count=2) == [[0, 1, 2], [3, 4, 5]]
    # equal costs: the first is split
    assert token_budget_micro_batches(P, T, budget=100, count=3) == [[0, 1], [2], [3, 4, 5]]
    assert len(token_budget_micro_batches(P, T, budget=100, count=6)) == 6


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="learner.micro_batch_tokens must be > 0"):
        token_budget_micro_batches([1], [1], budget=0)
    with pytest.raises(ValueError, match="3 micro-batches asked of 2 rows"):
        token_budget_micro_batches([1, 1], [1, 1], budget=10, count=3)
    with pytest.raises(ValueError, match="2 prompt lengths but 1 response"):
        token_budget_micro_batches([1, 1], [1], budget=10)
    with pytest.raises(ValueError, match="not divisible by learner.num_ranks"):
        micro_batch_plan([1] * 6, [1] * 6, num_ranks=4, mini_batches=1, micro_batch_size=2)


@st.composite
def _lengths(draw):
    n = draw(st.integers(1, 24))
    P = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n))
    T = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
    return P, T


@PROPS
@given(_lengths(), st.integers(1, 400), st.integers(0, 24))
def test_packing_properties(lengths, budget, count):
    P, T = lengths
    count = min(count, len(P))
    mbs = token_budget_micro_batches(P, T, budget, count)
    assert sorted(i for mb in mbs for i in mb) == list(range(len(P)))  # every row exactly once
    assert len(mbs) >= max(1, count) and all(mbs)
    assert all(len(mb) == 1 or _cost(P, T, mb) <= budget for mb in mbs)
    if count == 0:  # greedy: the next micro-batch's first row would not have fitted in the one before
        for a, b in zip(mbs, mbs[1:]):
            assert _cost(P, T, a + b[:1]) > budget


@PROPS
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.lists(st.integers(1, 50), min_size=36, max_size=36),
       st.integers(0, 200))
def test_plan_gives_every_rank_the_same_number_of_micro_batches(ranks, minis, per_mini, resp, budget):
    B = ranks * minis * per_mini
    P, T = [1 + (i % 4) for i in range(B)], resp[:B]
    plan = micro_batch_plan(P, T, num_ranks=ranks, mini_batches=minis, micro_batch_size=2, micro_batch_tokens=budget)
    assert len(plan) == ranks and all(len(p) == minis for p in plan)
    for m in range(minis):
        assert len({len(plan[r][m]) for r in range(ranks)}) == 1  # collectives line up under ZeRO-2/3
        for r in range(ranks):
            assert sorted(i for mb in plan[r][m] for i in mb) == list(range(m * per_mini, (m + 1) * per_mini))
    if not budget:  # fixed mode: today's consecutive slices of min(micro_batch_size, rows) rows
        assert plan[0][0] == [list(range(s, min(s + 2, per_mini))) for s in range(0, per_mini, 2)]


def _batch():
    g = torch.Generator().manual_seed(0)
    groups = []
    for k, (plen, rlens) in enumerate([(2, [1, 7, 3, 2]), (6, [0, 4, 12, 5])]):
        samples = [Sample(torch.randint(5, 40, (n,), generator=g).tolist(), [-0.5 - i] * n, "", False, 0)
                   for i, n in enumerate(rlens)]
        groups.append(Group(Prompt(k, "", list(range(3, 3 + plen)), "q", "1"), samples, rewards=[1.0, 0.0, 0.5, None]))
    return collate_groups(groups, pad_id=0)


def test_trim_padding_keeps_every_real_token_in_place():
    b = _batch()
    assert (b.prompt_len, b.response_len) == (6, 12)
    part = trim_padding(b.select(slice(0, 4)))  # group 0: prompt of 2, longest response 7
    assert (part.prompt_len, part.response_len) == (2, 7)
    full = b.select(slice(0, 4))
    assert torch.equal(part.input_ids, full.input_ids[:, 4:4 + 2 + 7])
    assert torch.equal(part.attention_mask, full.attention_mask[:, 4:13])
    assert torch.equal(part.response_mask, full.response_mask[:, :7])
    assert torch.equal(part.sampling_logprobs, full.sampling_logprobs[:, :7])
    assert int(part.attention_mask.sum()) == int(full.attention_mask.sum())  # nothing real was cut
    assert trim_padding(b) is b  # nothing to cut
    empty = trim_padding(b.select(torch.tensor([4])))  # an empty response keeps one response column
    assert (empty.prompt_len, empty.response_len) == (6, 1) and float(empty.response_mask.sum()) == 0.0


def test_token_budget_cuts_the_padding_share():
    b = _batch()
    P = b.attention_mask[:, :b.prompt_len].sum(1).tolist()
    T = b.response_lengths.tolist()
    fixed = micro_batch_plan(P, T, num_ranks=1, mini_batches=1, micro_batch_size=4)[0][0]
    budget = micro_batch_plan(P, T, num_ranks=1, mini_batches=1, micro_batch_size=4, micro_batch_tokens=40)[0][0]
    untrimmed = 1.0 - float(b.attention_mask.sum()) / b.input_ids.numel()
    assert padding_share(P, T, budget) < padding_share(P, T, fixed) < untrimmed
    assert padding_share(P, T, fixed) == pytest.approx(1 - (8 + 13 + 24 + 21) / (4 * 9 + 4 * 18))
