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


def synthetic_rows(n: int, seed: int = 0, max_value: int = 9) -> list[dict[str, str]]:
    """`n` rows with GSM8K's columns: `question`, and `answer` = reasoning + `#### <number>`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        p = make_problem(rng, max_value)
        rows.append({"question": p["question"], "answer": f"{p['reasoning']}\n#### {p['answer']}"})
    return rows
