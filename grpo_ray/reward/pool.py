"""The reward actor pool: completions are sharded over CPU actors that run the reward functions.

Rewards run outside the driver so that a slow or hung user function cannot stall the loop
unnoticed: the pool waits `timeout_s` for all shards at once and then fails the step, naming the
functions still running.
"""
from __future__ import annotations

import math
import threading
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayTaskError

from grpo_ray.config import RewardFunctionConfig
from grpo_ray.contracts import PromptBatch, Rollout, Scores
from grpo_ray.reward.functions import get_reward_functions

# Calls a worker runs at once: one scoring call plus `running()`, which the pool asks after a
# timeout (a hung call from an earlier step may still hold a thread).
_WORKER_CONCURRENCY = 4


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

    def score(self, prompts: list, completions: list[str],
              columns: dict[str, list]) -> dict[str, list[float | None]]:
        """Each function's scores of `completions`, by name.

        prompts: one chat (list of messages) per completion; columns: per-completion lists passed
        as keyword arguments (`answer`, `question`, ...), like TRL's dataset columns."""
        n = len(completions)
        for key, values in [("prompts", prompts), *columns.items()]:
            if len(values) != n:
                raise ValueError(f"reward worker: column {key!r} has {len(values)} rows for "
                                 f"{n} completions")
        wrapped = [[{"role": "assistant", "content": text}] for text in completions]
        out: dict[str, list[float | None]] = {}
        me = threading.get_ident()
        try:
            for name, fn, _ in self.functions:
                self._running[me] = name
                try:
                    scores = fn(prompts=prompts, completions=wrapped, **columns)
                except Exception as e:
                    raise RuntimeError(f"reward function {name!r} failed: "
                                       f"{type(e).__name__}: {e}") from e
                out[name] = _as_scores(scores, n, name)
        finally:
            self._running.pop(me, None)
        return out


def _as_scores(scores: Any, n: int, name: str) -> list[float | None]:
    try:
        values = list(scores)
    except TypeError:
        raise TypeError(f"reward function {name!r} returned {type(scores).__name__}, "
                        "not a list of scores") from None
    if len(values) != n:
        raise ValueError(f"reward function {name!r} returned {len(values)} scores for "
                         f"{n} completions")
    out: list[float | None] = []
    for v in values:
        try:
            f = None if v is None else float(v)
        except (TypeError, ValueError):
            raise TypeError(f"reward function {name!r} returned {v!r}, not a number or "
                            "None") from None
        out.append(None if f is None or math.isnan(f) else f)  # TRL writes None as NaN
    return out


def _shards(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges, sizes differing by at most one, none empty."""
    size, extra = divmod(n, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + size + (1 if k < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


class RewardPool:
    """Scores a step's rollout on the reward workers and sums the weighted functions."""

    def __init__(self, workers: list[ray.actor.ActorHandle],
                 functions: list[RewardFunctionConfig], timeout_s: float):
        if not workers:
            raise ValueError("reward pool: needs at least one worker")
        self.workers = workers
        self.weights = [float(f.weight) for f in functions]
        self.timeout_s = timeout_s

    def score(self, batch: PromptBatch, rollout: Rollout) -> Scores:
        """Per-function scores and weighted totals of every completion, prompt-major."""
        rows, texts = rollout.prompt_index, rollout.completion_texts
        if len(rows) != len(texts) or any(not 0 <= i < len(batch) for i in rows):
            raise ValueError(f"reward pool: rollout of {len(texts)} completions (prompt_index: "
                             f"{len(rows)} rows, largest {max(rows, default=-1)}) does not "
                             f"match a batch of {len(batch)} prompts")
        prompts = [batch.prompts[i] for i in rows]
        # the dataset's own columns first, as TRL passes them; the gold answer, the question and
        # the token ids keep their names over a dataset column of the same name
        columns = {name: [values[i] for i in rows] for name, values in batch.columns.items()}
        columns.update({"answer": [batch.answers[i] for i in rows],
                        "question": [batch.questions[i] for i in rows],
                        "completion_ids": rollout.completion_ids})
        shards = _shards(len(texts), len(self.workers))
        refs = [w.score.remote(prompts[a:b], texts[a:b], {k: v[a:b] for k, v in columns.items()})
                for w, (a, b) in zip(self.workers, shards)]
        try:
            parts = ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError:
            raise TimeoutError(f"reward pool: scoring {len(texts)} completions took longer than "
                               f"reward.timeout_s={self.timeout_s:g} s (still running: "
                               f"{self._still_running(len(shards))})") from None
        except RayTaskError as e:  # surface the one-line error naming the function, not Ray's
            raise e.cause from e
        if not parts:
            return Scores(per_function={}, total=[])
        names = list(parts[0])
        if len(names) != len(self.weights):
            raise ValueError(f"reward pool: workers run {len(names)} functions ({names}) but "
                             f"{len(self.weights)} weights were given")
        per_function = {name: [s for part in parts for s in part[name]] for name in names}
        # TRL's rule: a function's None means it does not apply to the row; the row is
        # unscorable (no advantage) only when no function scored it.
        total = []
        for i in range(len(texts)):
            row = [(w, per_function[name][i]) for w, name in zip(self.weights, names)]
            scored = [w * s for w, s in row if s is not None]
            total.append(sum(scored) if scored else None)
        return Scores(per_function=per_function, total=total)

    def _still_running(self, used: int) -> str:
        try:
            names = ray.get([w.running.remote() for w in self.workers[:used]], timeout=2.0)
        except GetTimeoutError:
            return "unknown, the workers do not answer"
        return ", ".join(sorted({n for part in names for n in part})) or "none"


def build_reward_workers(functions: list[RewardFunctionConfig], mode: str, num_workers: int,
                         num_cpus: float, runtime_env: dict[str, Any] | None = None,
                         ready_timeout_s: float = 120.0) -> list[ray.actor.ActorHandle]:
    """Start `num_workers` reward actors and wait until they have loaded their functions.

    The functions are resolved here first, so a bad name or import path fails with its one-line
    message before any actor starts. `runtime_env` carries custom reward modules to the workers
    (e.g. `{"py_modules": [...]}` on a cluster)."""
    get_reward_functions(functions, mode)
    options: dict[str, Any] = {"num_cpus": num_cpus, "max_concurrency": _WORKER_CONCURRENCY}
    if runtime_env is not None:
        options["runtime_env"] = runtime_env
    actor = ray.remote(RewardWorker)
    workers = [actor.options(**options).remote(functions, mode) for _ in range(num_workers)]
    try:
        ray.get([w.names.remote() for w in workers], timeout=ready_timeout_s)
    except GetTimeoutError:
        for w in workers:
            ray.kill(w)
        raise TimeoutError(f"reward pool: {num_workers} workers of {num_cpus:g} CPUs each did not "
                           f"start within {ready_timeout_s:g} s (not enough free CPUs?)") from None
    return workers
