"""Arithmetic word problems generated in code, in GSM8K's format, for offline runs and tests."""
from __future__ import annotations

import random

_NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Eva", "Leo", "Zoe"]
_ITEMS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "marbles"]


def make_problem(rng: random.Random, max_value: int = 9) -> dict[str, str]:
    """One problem: question, a one-line reasoning and the integer answer (as text)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, max_value), rng.randint(1, max_value)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        r, ans = f"{a} + {b} = {a + b}", a + b
    elif kind == "sub":
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        r, ans = f"{a} - {b} = {a - b}", a - b
    else:
        q = f"{name} buys {a} bags with {b} {item} in each. How many {item} does {name} have?"
        r, ans = f"{a} * {b} = {a * b}", a * b
    return {"question": q, "reasoning": r, "answer": str(ans)}


def num_distinct_questions(max_value: int) -> int:
    """How many different questions `make_problem` can produce: per name and item, every
    ordered (a, b) for add and mul, and every unordered pair for sub (it sorts a >= b)."""
    m = max_value
    return len(_NAMES) * len(_ITEMS) * (m * m + m * (m + 1) // 2 + m * m)


def _row(p: dict[str, str]) -> dict[str, str]:
    return {"question": p["question"], "answer": f"{p['reasoning']}\n#### {p['answer']}"}


def synthetic_rows(n: int, seed: int = 0, max_value: int = 9) -> list[dict[str, str]]:
    """`n` rows with GSM8K's columns: `question`, and `answer` = reasoning + `#### <number>`.
    Drawn independently, so a question can repeat (159 of 2000 rows are repeats with seed 3407
    and max_value 9); `held_out_rows` gives distinct questions outside a train split."""
    rng = random.Random(seed)
    return [_row(make_problem(rng, max_value)) for _ in range(n)]


def held_out_rows(n: int, seed: int, max_value: int, exclude: set[str]) -> list[dict[str, str]]:
    """`n` rows with distinct questions, none of them in `exclude` (the train questions), so an
    evaluation never scores a problem the policy trained on."""
    available = num_distinct_questions(max_value) - len(exclude)
    if n > available:
        raise ValueError(f"synthetic held-out split: only {available} questions with "
                         f"synthetic_max_value={max_value} are not in the train split, "
                         f"{n} asked (lower data.num_synthetic or raise data.synthetic_max_value)")
    rng = random.Random(seed)
    seen = set(exclude)
    rows = []
    while len(rows) < n:
        p = make_problem(rng, max_value)
        if p["question"] not in seen:
            seen.add(p["question"])
            rows.append(_row(p))
    return rows
