"""Generated problems: right arithmetic, reproducible, a held-out split that shares no question."""
from __future__ import annotations

import random
import re

import pytest

from grpo_ray.answer_format import gold_answer
from grpo_ray.config import DataConfig
from grpo_ray.driver.data.dataset import load_rows
from grpo_ray.driver.data.synthetic import (held_out_rows, make_problem, num_distinct_questions,
                                            synthetic_rows)

_PATTERNS = {
    r"(\w+) has (\d+) (\w+) and gets (\d+) more\. How many \3 does \1 have now\?": "+",
    r"(\w+) has (\d+) (\w+) and gives away (\d+)\. How many \3 does \1 have left\?": "-",
    r"(\w+) buys (\d+) bags with (\d+) (\w+) in each\. How many \4 does \1 have\?": "*",
}


def _solve(question: str) -> tuple[int, int, str]:
    for pattern, op in _PATTERNS.items():
        m = re.fullmatch(pattern, question)
        if m:
            a, b = (int(m[2]), int(m[4])) if op != "*" else (int(m[2]), int(m[3]))
            return a, b, op
    raise AssertionError(f"unknown question template: {question}")


def test_rows_are_correct_arithmetic():
    rows = synthetic_rows(300, seed=5, max_value=12)
    ops = set()
    for row in rows:
        a, b, op = _solve(row["question"])
        ops.add(op)
        assert 1 <= a <= 12 and 1 <= b <= 12
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert expected >= 0
        assert row["answer"] == f"{a} {op} {b} = {expected}\n#### {expected}"
        assert gold_answer(row["answer"]) == str(expected)
    assert ops == {"+", "-", "*"}


def test_rows_are_deterministic_per_seed():
    assert synthetic_rows(50, seed=1) == synthetic_rows(50, seed=1)
    assert synthetic_rows(50, seed=1) != synthetic_rows(50, seed=2)


def test_num_distinct_questions_matches_what_the_generator_makes():
    # 8 names x 8 items x (4 ordered add pairs + 3 unordered sub pairs + 4 ordered mul pairs)
    assert num_distinct_questions(2) == 704
    rng = random.Random(0)
    seen = {make_problem(rng, 2)["question"] for _ in range(30_000)}
    assert len(seen) == 704


def test_held_out_rows_are_distinct_and_skip_the_excluded():
    train = synthetic_rows(300, seed=0, max_value=3)
    exclude = {r["question"] for r in train}
    held = held_out_rows(200, seed=1, max_value=3, exclude=exclude)
    questions = [r["question"] for r in held]
    assert len(held) == 200 and len(set(questions)) == 200
    assert not set(questions) & exclude


def test_held_out_rows_refuse_more_than_the_problem_space():
    # max_value 1: 64 x (1 + 1 + 1) = 192 questions; 10 taken by the train split
    exclude = {r["question"] for r in synthetic_rows(10, seed=0, max_value=1)}
    with pytest.raises(ValueError, match=rf"only {192 - len(exclude)} questions"):
        held_out_rows(190, seed=1, max_value=1, exclude=exclude)


def test_load_rows_synthetic_splits_are_disjoint_and_reproducible():
    cfg = DataConfig(source="synthetic", num_synthetic=500, seed=11)
    train, test = load_rows(cfg), load_rows(cfg, "test")
    assert len(train) == len(test) == 500
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert load_rows(cfg, "test") == test
    assert all(r["gold"] == r["answer"].split("#### ")[1] for r in train + test)
    with pytest.raises(ValueError, match="data.source=synthetic has splits 'train' and 'test', "
                                         "not 'validation'"):
        load_rows(cfg, "validation")
