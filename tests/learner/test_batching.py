"""Micro-batch planning by rows or by a budget of padded tokens, its padding fraction, and the
padded tensors of one micro-batch."""
from __future__ import annotations

import random

import pytest
import torch

from grpo_ray.learner.batching import cat_padded, pad_rows, padding_fraction, plan_micro_batches


def test_rows_in_order_when_there_is_no_budget():
    assert plan_micro_batches([5, 9, 2, 7, 3], max_rows=2) == [[0, 1], [2, 3], [4]]
    assert plan_micro_batches([], max_rows=2) == []
    # rows x longest: 2 x 9 + 2 x 7 + 1 x 3 = 35 positions for 26 tokens
    assert padding_fraction([5, 9, 2, 7, 3], [[0, 1], [2, 3], [4]]) == pytest.approx(9 / 35)


def test_token_budget_groups_rows_longest_first():
    lengths = [5, 9, 2, 7, 3, 9, 4]
    # sorted: 9 (row 1), 9 (row 5), 7, 5, 4, 3, 2; budget 20: 2 x 9 = 18 fits, 3 x 9 does not;
    # then 7: 2 x 7 = 14 fits, 3 x 7 does not; then 4 x 4 = 16 fits, 5 x 4 does not... 4 rows
    # of at most 4 tokens: 4, 3, 2 (3 x 4 = 12)
    plan = plan_micro_batches(lengths, max_rows=1, max_tokens=20)
    assert plan == [[1, 5], [3, 0], [6, 4, 2]]
    assert padding_fraction(lengths, plan) == pytest.approx(1 - 39 / (18 + 14 + 12))


def test_grouping_by_length_removes_the_padding_of_mixed_rows():
    lengths = [100, 10, 100, 10]
    assert padding_fraction(lengths, plan_micro_batches(lengths, max_rows=2)) == pytest.approx(
        1 - 220 / 400)
    by_tokens = plan_micro_batches(lengths, max_rows=2, max_tokens=200)
    assert by_tokens == [[0, 2], [1, 3]] and padding_fraction(lengths, by_tokens) == 0.0


def test_a_row_longer_than_the_budget_gets_its_own_micro_batch():
    assert plan_micro_batches([30, 4, 4, 12], max_rows=8, max_tokens=10) == [[0], [3], [1, 2]]


def test_budget_plan_property_every_row_once_and_within_budget():
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 300) for _ in range(rng.randint(0, 40))]
        budget = rng.randint(1, 2000)
        plan = plan_micro_batches(lengths, max_rows=1, max_tokens=budget)
        assert sorted(i for mb in plan for i in mb) == list(range(len(lengths)))
        for mb in plan:
            longest = max(lengths[i] for i in mb)
            assert len(mb) * longest <= budget or len(mb) == 1
        # lengths never increase along the plan: like lengths share a micro-batch
        flat = [lengths[i] for mb in plan for i in mb]
        assert flat == sorted(flat, reverse=True)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        plan_micro_batches([3], max_rows=1, max_tokens=0)
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        plan_micro_batches([3], max_rows=0)
    assert padding_fraction([], []) == 0.0


def test_pad_rows_right_pads_and_points_at_the_predicting_positions():
    mb = pad_rows([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], [0.5, -1.0],
                  [[-0.1, -0.2], [-0.3, -0.4, -0.5]], torch.device("cpu"))
    assert mb.input_ids.tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # hidden state k predicts token k + 1: the last prompt token predicts the first completion's
    assert mb.positions.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert mb.targets.tolist() == [[7, 8, 0], [9, 10, 11]]
    assert mb.mask.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(mb.sampling_logp,
                               torch.tensor([[-0.1, -0.2, 0.0], [-0.3, -0.4, -0.5]]))
    assert mb.advantages.tolist() == [0.5, -1.0]
    joined = cat_padded([mb.mask, torch.ones(1, 5, dtype=torch.bool)])
    assert joined.shape == (3, 5) and joined[:2, 3:].sum() == 0 and joined[2].all()
