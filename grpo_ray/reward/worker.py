"""The reward actor: runs every configured reward function on a shard of completions
(`cluster.rewards` shards a step over these actors, and replaces them when they die or hang).

A function's failure is its rows' failure, not the step's: what it cannot score is None (TRL's
rule for "does not apply"), counted in `ShardScores.failed` with its first error.
"""
from __future__ import annotations

import math
import os
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

from grpo_ray.config import RewardFunctionConfig
from grpo_ray.faults import first_line
from grpo_ray.reward.functions import FailedScore
from grpo_ray.reward.registry import get_reward_functions


@dataclass
class ShardScores:
    """One worker's scores of its shard of completions."""

    per_function: dict[str, list[float | None]] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    """Rows each function could not score (raised, hung, non-finite, None instead of a list)."""
    errors: dict[str, str] = field(default_factory=dict)
    """The first error of each function that failed, one line."""

    def fail(self, name: str, rows: int, error: str) -> None:
        self.per_function[name] = [None] * rows
        self.failed[name] = rows
        self.errors[name] = error


class RewardWorker:
    """Runs every configured reward function on a shard of completions (a plain class:
    `ray.remote` is applied where it is placed)."""

    def __init__(self, functions: list[RewardFunctionConfig], mode: str):
        self.functions = get_reward_functions(functions, mode)
        self._running: dict[int, str] = {}  # thread id -> name of the function it runs

    def names(self) -> list[str]:
        return [name for name, _, _ in self.functions]

    def running(self) -> list[str]:
        """Names of the functions being run now (asked by the pool after a timeout)."""
        return sorted(set(self._running.values()))

    def score(self, prompts: list, completions: list[str], columns: dict[str, list],
              skip: dict[str, str] | None = None) -> ShardScores:
        """Each function's scores of `completions`, by name, and what failed (module docstring).

        prompts: one chat (list of messages) per completion; columns: per-completion lists passed
        as keyword arguments (`answer`, `question`, ...), like TRL's dataset columns; skip:
        functions not to run (name -> why), their rows failed (the pool's retry after a hang)."""
        n = len(completions)
        for key, values in [("prompts", prompts), *columns.items()]:
            if len(values) != n:
                raise ValueError(f"reward worker: column {key!r} has {len(values)} rows for "
                                 f"{n} completions")
        wrapped = [[{"role": "assistant", "content": text}] for text in completions]
        out = ShardScores()
        me = threading.get_ident()
        try:
            for name, fn, _ in self.functions:
                if skip and name in skip:
                    out.fail(name, n, skip[name])
                    continue
                self._running[me] = name
                try:
                    scores = fn(prompts=prompts, completions=wrapped, **columns)
                except Exception as e:  # noqa: BLE001 - the user's function: its rows fail
                    out.fail(name, n, f"raised {first_line(e)}{_where(e)}")
                    continue
                out.per_function[name], bad = _as_scores(scores, n, name)
                if bad:
                    out.failed[name], out.errors[name] = len(bad), _why(bad[0], scores)
        finally:
            self._running.pop(me, None)
        return out


def _where(error: BaseException) -> str:
    """` at file.py:LINE` of the innermost frame of the error's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    return f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""


def _why(bad: Any, scores: Any) -> str:
    """One line on the first value `_as_scores` refused."""
    if scores is None:
        return "returned None instead of a list of scores"
    if isinstance(bad, FailedScore):
        return f"could not score a row: {bad.error}"
    return f"returned a non-finite score ({bad!r})"


def _as_scores(scores: Any, n: int, name: str) -> tuple[list[float | None], list[Any]]:
    """The function's scores as floats or None, and the values that were not finite numbers
    (NaN, inf, a `FailedScore`; every row when it returned None instead of a list). A wrong number of values or
    one that is not a number raises: that is a bug in the function, not a passing failure."""
    if scores is None:
        return [None] * n, [None] * n
    try:
        values = list(scores)
    except TypeError:
        raise TypeError(f"reward function {name!r} returned {type(scores).__name__}, "
                        "not a list of scores") from None
    if len(values) != n:
        raise ValueError(f"reward function {name!r} returned {len(values)} scores for "
                         f"{n} completions")
    out: list[float | None] = []
    bad: list[Any] = []
    for v in values:
        if isinstance(v, FailedScore):
            bad.append(v)
            out.append(None)
            continue
        try:
            f = None if v is None else float(v)
        except (TypeError, ValueError):
            raise TypeError(f"reward function {name!r} returned {v!r}, not a number or "
                            "None") from None
        if f is not None and not math.isfinite(f):
            bad.append(f)
            f = None
        out.append(f)
    return out, bad


